"""Synthetic MR studies for tests, demos and benchmarks."""
