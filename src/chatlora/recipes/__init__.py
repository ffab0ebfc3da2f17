"""One module per workflow (train, data check, ...), readable top to bottom."""
