"""Training on several processes: who is who (world), the global batch split and balanced over
them (split, balance), FSDP2 (fsdp) and agreeing on a flag (ranks)."""
