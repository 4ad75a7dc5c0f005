"""pyowt: parallel CNN training in PyTorch.

Data, model and One-Weird-Trick (OWT) hybrid parallelism over fused Triton and C++/CUDA
kernels, with autograd-aware collectives over torch.distributed. ``pyowt.info()`` tells
what this installation was built with.
"""
__version__ = "0.1.0"

from . import _extension  # noqa: E402  (loads pyowt._C, registering the C++ ops, or warns)
from . import ops  # noqa: E402
from .info import info  # noqa: E402
from .parallel import parallelize  # noqa: E402

__all__ = ["__version__", "info", "ops", "parallelize"]
