"""Triton kernels of pyowt (installed as ``pyowt.kernels``).

One file per op: the ``@triton.jit`` kernels and the host-side launchers that size their
grids. Registration as PyTorch operators, autograd and backend choice live in
``pyowt.ops``. Importing this package never fails: without Triton, ``HAS_TRITON`` is False.

On a machine without a GPU the kernels run on CPU tensors when ``TRITON_INTERPRET=1`` is
set before this package is imported (Triton decides at decoration time).
"""
import os

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
    TRITON_VERSION = triton.__version__
except ImportError:  # pragma: no cover - exercised on installs without triton
    HAS_TRITON = False
    TRITON_VERSION = None


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for host-side grid sizing: ``triton.cdiv`` is a constexpr function
    whose call wrapper costs ~3 us of host time per call outside a kernel."""
    return -(-a // b)
