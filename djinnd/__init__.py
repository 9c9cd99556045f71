"""djinnd: one model, many sessions, one GPU."""

__version__ = "0.1.0"
