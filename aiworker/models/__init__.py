"""Models that ship with aiworker: one folder each, with model.yaml, weights and a card."""
