"""Evaluation suites run by evaluate.py: one module per suite (see evaluation/README in evaluate.py)."""
