"""Plumbing every step shares: configuration (Hydra configs and their typed schemas), device and precision, errors
and logging, atomic file writes, checkpoints, the training engine, provenance, tracking and torch.distributed."""
