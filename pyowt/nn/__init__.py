"""Drop-in modules built on pyowt's fused operators."""
from .conv import FusedConv2d, fuse_conv_relu

__all__ = ["FusedConv2d", "fuse_conv_relu"]
