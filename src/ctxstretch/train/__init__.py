"""Training: one stage on accelerate, and weight merging."""
