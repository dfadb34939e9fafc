"""Training and evaluation engine: the loop, checkpoints, optimiser, distributed helpers."""
