"""Metric defaults that commands need for their help, without importing torch or torchmetrics."""

#: Bootstrap resamples used when a caller asks for intervals without saying how many.
DEFAULT_BOOTSTRAP_RESAMPLES = 10_000
