"""Benchmarks: the training step, the ranking, and checkpoint stress."""
