"""Argument checks shared by the Python front ends of the ops.

They run before any backend so that every backend reports a user's mistake the same way:
``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong shape, value or device.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(t, arg: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")


def check_float_dtype(t: torch.Tensor, arg: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{arg} must be float32, float16 or bfloat16, got {t.dtype}")


def normalize_dim(dim, ndim: int, arg: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if ndim < 1:
        raise ValueError(f"{arg} must have at least 1 dimension, got a 0-d tensor")
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim must be in [{-ndim}, {ndim - 1}] for a {ndim}-d {arg}, got {dim}")
    return dim % ndim


def check_same(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{b_name} dtype {b.dtype} differs from {a_name} dtype {a.dtype}")
    if a.device != b.device:
        raise ValueError(f"{b_name} is on {b.device} but {a_name} is on {a.device}")


def tensors_on_one_device(x: torch.Tensor, *others) -> bool:
    """True when every one of ``others`` is None or a tensor on x's device.

    The C++ ops check their arguments themselves, except across devices the dispatcher
    resolves first: a meta weight with a CPU x would reach the fake kernel and "succeed".
    The fused ops' fast paths call this before handing the checks to C++.
    """
    device = x.device
    for t in others:
        if t is not None and (not isinstance(t, torch.Tensor) or t.device != device):
            return False
    return True


def preferred_memory_format(x: torch.Tensor, dim: int) -> torch.memory_format:
    """The layout kernels keep: channels-last inputs stay channels-last (channel innermost).

    Mirrors ``preferred_format`` in csrc/channel_layout.h; fake kernels use it to promise
    the same output strides as the real ones.
    """
    if dim == 1 and not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def channel_layout(x: torch.Tensor, dim: int, fmt: torch.memory_format):
    """(outer, channels, inner): a dense tensor in ``fmt`` seen in memory order."""
    channels = x.shape[dim]
    if fmt != torch.contiguous_format:
        return x.numel() // max(channels, 1), channels, 1
    outer = 1
    for s in x.shape[:dim]:
        outer *= s
    inner = 1
    for s in x.shape[dim + 1:]:
        inner *= s
    return outer, channels, inner
