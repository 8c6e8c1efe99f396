"""Per-sample zero-shot optimisation methods."""
