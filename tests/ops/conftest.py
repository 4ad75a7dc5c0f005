"""Fixtures shared by the op tests (the CUDA conv kernels' tests use all three)."""

import pytest
import torch

from pyowt import _extension
from pyowt.ops.conv2d import cuda_wgmma_tiles_enabled

from ..utils import fp32_precision, torch_threads


@pytest.fixture
def one_thread():
    """One intra-op thread: the CPU emulations run thousands of tiny ops, where threads
    only add overhead."""
    with torch_threads(1):
        yield


@pytest.fixture
def tf32(request):
    """Set torch's TF32 flags to ``request.param`` (indirect parametrization) for the test,
    then restore them."""
    with fp32_precision(request.param):
        yield request.param


@pytest.fixture
def conv_cuda_ops():
    """(forward, backward) of pyowt::conv2d_bias_act as registered for CUDA; skips without
    the extension, fails if a built extension lacks the CUDA kernels."""
    if not _extension.STATUS.loaded:
        pytest.skip(f"pyowt._C not loaded: {_extension.STATUS.reason}")
    assert _extension.STATUS.with_cuda, "pyowt._C was built without CUDA on a machine with a GPU"
    for name in ("conv2d_bias_act", "conv2d_bias_act_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyowt::{name}", "CUDA"), name
    return torch.ops.pyowt.conv2d_bias_act, torch.ops.pyowt.conv2d_bias_act_backward


def wgmma_tiles_usable() -> bool:
    """Whether the CUDA conv uses its wgmma tiles here (gpu_check.sh switches them off when
    they fail its probe: a device fault would take the worker's other tests down with them)."""
    return cuda_wgmma_tiles_enabled()
