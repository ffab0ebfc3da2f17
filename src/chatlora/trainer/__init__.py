"""Training: the trainer (trainer.py) and what it is made of. speed/: the step-cost machinery (CUDA
graphs, walks found once, late read-backs, fused gradient checks); distributed/: several processes
(world, batch split and balance, FSDP2, any_rank); lifecycle/: the run around the loop (checkpoints,
resume, stop on signal, what is kept on failure). Every override of a private transformers or
accelerate member is in overrides.py."""
