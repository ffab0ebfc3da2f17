"""Model sources, tokenizer fixes, LoRA wrapping and generation."""
