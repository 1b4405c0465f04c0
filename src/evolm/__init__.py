"""evolm: fine-tune language models by evolution."""

__version__ = "0.1.0"
