"""The run around the training loop: complete-or-absent checkpoints, resume, stop on signal, and
what is kept of the run folder when something fails."""
