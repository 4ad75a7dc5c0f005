"""Models the benchmarks and the CLI train."""
from .alexnet import AlexNetSmall, alexnet

__all__ = ["AlexNetSmall", "alexnet"]
