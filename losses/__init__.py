"""Losses: pure functions and small modules."""
