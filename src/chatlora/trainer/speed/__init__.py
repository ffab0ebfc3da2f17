"""What makes a training step cheap on the host: CUDA graphs over the pass, the model walks found
once per run, device values read back late, and gradient checks in a few fused kernels."""
