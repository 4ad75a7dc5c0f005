"""Autocast for the fused ops, the way ATen treats the ops they replace.

Operators registered through ``torch.library`` get no autocast kernel, so inside
``torch.autocast`` a bf16 activation coming out of an ATen layer would meet an fp32
weight and fail the dtype check (and an all-fp32 network would silently stay in fp32).
ATen puts ``conv2d`` and ``linear`` on autocast's lower-precision list; the fused ops do
the same, and ``bias_relu`` (the epilogue of a split-weight layer's conv or linear,
applied after its partial sums are reduced) follows them so a layer's pieces agree.
The casts happen before the op, so gradients reach fp32 parameters through ``.to``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


# One call answers "autocast is off everywhere", the common case, without building a device
# (torch._C._is_any_autocast_enabled exists from torch 2.4; older ones ask per device).
_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs lower-precision ops in on ``device_type``, or None when off."""
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_inputs(*tensors) -> Tuple:
    """``tensors`` with every floating tensor cast to the autocast dtype of the first
    tensor's device when autocast is on there; unchanged otherwise (and non-tensors
    pass through, for the argument checks to report)."""
    if not _any_autocast_enabled():
        return tensors
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        return tensors
    dtype = autocast_dtype(first.device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype
                 else t for t in tensors)
