"""Evolutionary search over LoRA hyperparameters (`evolm search`, `evolm analyze`)."""

from evolm.search.analysis import analyze
from evolm.search.config import SearchRunConfig
from evolm.search.runner import run_search

__all__ = ["SearchRunConfig", "analyze", "run_search"]
