"""Small shared utilities: atomic I/O, W&B set-up."""
