"""Inference: load the selected series as a volume, run a registered model on it."""
