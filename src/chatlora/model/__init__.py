"""Model sources, tokenizer fixes, LoRA wrapping, the token loss, attention and kernels; loading a run."""
