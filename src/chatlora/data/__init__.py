"""Data: files → conversations → validation → token ids + labels → batches."""
