"""Prediction files and the ``score`` command: scoring outputs of any model with one code path."""
