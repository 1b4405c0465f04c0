"""Evolution Strategies in weight space.

noise.py: counter-based Gaussian noise; strategy.py: the ask/tell strategy, where θ is updated;
lora_space.py: what evolves by default (a LoRA adapter); loop.py: the run (ask, evaluate with the
population engine, tell, log, checkpoint).
"""
