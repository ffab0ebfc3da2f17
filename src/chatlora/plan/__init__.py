"""The memory and speed plan: what a config will need on a GPU, before any weight is loaded."""
