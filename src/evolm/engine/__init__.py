"""The population engine: one batched generation for a whole population of low-rank-perturbed models.

layer.py: where a member's delta enters the matmul; decoding.py: the decoding loop and the Backend
protocol; population.py: the engine; transformers_backend.py and fused_backend.py: the backends.
"""

from evolm.engine.decoding import SamplingParams
from evolm.engine.layer import LowRankWeights, find_target_linears
from evolm.engine.population import Generation, PopulationEngine

__all__ = ["Generation", "LowRankWeights", "PopulationEngine", "SamplingParams", "find_target_linears"]
