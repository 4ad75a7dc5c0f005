"""Dropout whose mask does not depend on how the tensor is split across workers.

torch's dropout draws from a stateful generator, so a worker holding rows 64..127 of a batch
cannot draw the bits the single-process model would draw for those rows. Here every element's
keep/drop decision is a hash of (seed, layer salt, step, the element's index in the *global*
tensor): any K, any split, the same mask, and a replicated region draws identical masks on
all workers without communicating. The reference model for parity tests uses the same module
on the unsplit tensor (``SeededDropout`` with offsets 0).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

_MASK32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer finalizer (murmur3-style constants < 2^31 so int64 products never
    # overflow): consecutive indices give unrelated outputs.
    h = h & _MASK32
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & _MASK32
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & _MASK32
    return h ^ (h >> 16)


def keep_mask(global_shape: Sequence[int], coords: Sequence[torch.Tensor],
              p: float, seed: int, salt: int, step: int, device=None) -> torch.Tensor:
    """Boolean keep-mask of the block of a tensor of ``global_shape`` whose indices along
    dim d are ``coords[d]`` (1-D int64), drawn as the whole tensor's mask would be."""
    index = torch.zeros((), dtype=torch.int64, device=device)
    for d, (size, coord) in enumerate(zip(global_shape, coords)):
        shape = [1] * len(coords)
        shape[d] = coord.numel()
        index = index * size + coord.to(device=device, dtype=torch.int64).view(shape)
    key = _mix32(torch.tensor((seed * 0x9E3779B1 + salt * 0x85EBCA6B + step * 0xC2B2AE35) & _MASK32, device=device))
    lo = _mix32(index ^ key)
    hi = _mix32((index >> 32) ^ lo ^ 0x27D4EB2F)
    u = hi.to(torch.float64) * (1.0 / 4294967296.0)
    return u >= p


class SeededDropout(nn.Module):
    """Drop-in for ``nn.Dropout`` with split-invariant masks (see the module docstring).

    Every training-mode call advances ``step``, so consecutive steps draw fresh masks; two
    copies with the same ``seed``/``salt`` that see the same number of calls draw the same.
    The mask of element ``i`` of the global tensor is the same whichever worker computes it.
    """

    def __init__(self, p: float = 0.5, seed: int = 0, salt: int = 0):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability p must be in [0, 1], got {p}")
        self.p, self.seed, self.salt = float(p), int(seed), int(salt)
        self.step = 0

    def extra_repr(self) -> str:
        return f"p={self.p}, seed={self.seed}, salt={self.salt}"

    def forward(self, x: torch.Tensor, global_shape=None, offsets=None, step=None, rows=None) -> torch.Tensor:
        """``x`` is the block at ``offsets`` of a tensor of ``global_shape`` (default: all of
        it); ``rows`` (1-D int64), if given, are the global indices of x's rows instead."""
        if not self.training or self.p == 0.0:
            return x
        if step is None:
            step = self.step
            self.step += 1
        if self.p == 1.0:
            return x * 0.0
        global_shape = tuple(x.shape) if global_shape is None else tuple(global_shape)
        offsets = (0,) * x.dim() if offsets is None else tuple(offsets)
        coords = [torch.arange(off, off + n) for off, n in zip(offsets, x.shape)]
        if rows is not None:
            coords[0] = rows
        mask = keep_mask(global_shape, coords, self.p, self.seed, self.salt, step, x.device)
        return x * mask.to(x.dtype) * (1.0 / (1.0 - self.p))


def seeded_dropout_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with every ``nn.Dropout`` replaced (in place) by a :class:`SeededDropout`
    salted by its position, as :func:`pyowt.parallelize` does: the single-process reference
    of a parallelized model with dropout on."""
    for i, (name, mod) in enumerate(list(model.named_modules())):
        for child_name, child in list(mod.named_children()):
            if type(child) is nn.Dropout:
                setattr(mod, child_name, SeededDropout(child.p, seed=seed, salt=_salt(f"{name}.{child_name}".lstrip("."))))
    return model


def _salt(name: str) -> int:
    # Stable across processes (str hash() is randomized per interpreter).
    h = 2166136261
    for ch in name.encode():
        h = ((h ^ ch) * 16777619) & _MASK32
    return h
