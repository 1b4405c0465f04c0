"""The population engine: one batched generation for a whole population of low-rank-perturbed models.

layer.py: where a member's delta enters the matmul (the routing object); population.py: the engine;
scheduler.py: continuous refill of KV slots; decoding.py: sampling, stop strings and the wave-by-wave
loop; attention.py: decode attention over slots; transformers_backend.py (any model, waves) and
fused_backend.py (Llama-family models: slots, batched member matmuls, CUDA graphs): the backends.
"""

from evolm.engine.layer import LowRankWeights, Routing, find_target_linears
from evolm.engine.population import Completions, PopulationEngine
from evolm.engine.sampling import SamplingParams

__all__ = ["Completions", "LowRankWeights", "PopulationEngine", "Routing", "SamplingParams", "find_target_linears"]
