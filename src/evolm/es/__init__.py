"""Evolution Strategies in weight space.

noise.py: counter-based Gaussian noise; strategy.py: the ask/tell strategy, where θ is updated (it knows no
language model); space.py and one file per kind of what evolves: lora_space.py (a LoRA adapter, the
default), full_lowrank_space.py (the weight matrices, rank-r EGGROLL noise, members evaluated together)
and full_space.py (the weight matrices, dense noise, members one after another); loop.py: one
generation (ask, evaluate with the population engine, tell, record, checkpoint); runner.py: the run
around it (prepare, resume, load, export).
"""
