"""Drop-in modules built on pyowt's fused operators."""
from .conv import FusedConv2d, fuse_conv_relu
from .linear import ColumnParallelLinear, RowParallelLinear
from .loss import ParallelCrossEntropy

__all__ = ["FusedConv2d", "fuse_conv_relu"]
__all__ += ["ColumnParallelLinear", "RowParallelLinear", "ParallelCrossEntropy"]
