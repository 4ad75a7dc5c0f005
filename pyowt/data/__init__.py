"""Datasets the CLI and benchmarks train on without downloads."""
from .digits import digits_dataset, synthetic_dataset

__all__ = ["digits_dataset", "synthetic_dataset"]
