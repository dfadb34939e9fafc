"""Training and evaluation engine: the run (train), the step loop (epoch), evaluation, the run
log, the optimiser and schedule, the machine (runtime) and torchrun (distributed)."""
