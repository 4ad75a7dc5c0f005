"""Wire layout for gathers and scatters along any dim with uneven per-rank sizes.

The raw collectives move dense buffers whose first dimension is split into K equal pieces.
A tensor split along ``dim`` with per-rank sizes ``sizes`` (as ``torch.tensor_split``
gives: the first N mod K ranks hold one more) is brought to that layout by

1. moving ``dim`` to the front, the other dims in their natural order (no copy for dim 0 of
   a contiguous tensor);
2. padding every piece with zero rows to ``m = max(sizes)``.

The wire layout must be identical on every rank, so it cannot follow each input's strides
(a channels-last piece with one channel has the strides of a contiguous one, and ranks may
hold different layouts). Unpacking undoes both steps and returns the input's memory format
(channels-last in, channels-last out; anything else comes out contiguous). All functions are
ordinary differentiable torch ops, so they serve inside autograd backward passes and, around
the packed-layout autograd functions, carry gradients through the layout change themselves
(padding rows get zero gradient). Everything here is traceable by torch.compile.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def wire_perm(x: torch.Tensor, dim: int) -> List[int]:
    """``dim`` first, then the other dims in natural order: the same on every rank."""
    return [dim] + [i for i in range(x.dim()) if i != dim]


def _inverse(perm: Sequence[int]) -> List[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _to_front(x: torch.Tensor, perm: Sequence[int]) -> torch.Tensor:
    return x if perm[0] == 0 else x.permute(*perm)


def _restore(t: torch.Tensor, perm: Sequence[int], fmt: torch.memory_format) -> torch.Tensor:
    """Permute wire-layout ``t`` back and make it dense in memory format ``fmt``."""
    out = t if perm[0] == 0 else t.permute(*_inverse(perm))
    return out.contiguous(memory_format=fmt)


def _zeros(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.new_zeros((rows,) + tuple(t.shape[1:]))


def pack_piece(x: torch.Tensor, dim: int, m: int) -> Tuple[torch.Tensor, List[int]]:
    """This rank's piece (size s <= m along ``dim``) -> dense (m, *rest); returns (t, perm)."""
    perm = wire_perm(x, dim)
    t = _to_front(x, perm)
    if t.shape[0] < m:
        t = torch.cat([t, _zeros(t, m - t.shape[0])])
    return t.contiguous(), perm


def unpack_gathered(buf: torch.Tensor, sizes: Sequence[int], m: int, perm: Sequence[int],
                    fmt: torch.memory_format) -> torch.Tensor:
    """(K*m, *rest) gathered pieces -> the full tensor (sum(sizes) along the original dim)."""
    if any(s != m for s in sizes):
        buf = torch.cat([buf[r * m:r * m + s] for r, s in enumerate(sizes)])
    return _restore(buf, perm, fmt)


def pack_full(x: torch.Tensor, dim: int, sizes: Sequence[int], m: int) -> Tuple[torch.Tensor, List[int]]:
    """The full tensor (sum(sizes) along ``dim``) -> dense (K*m, *rest), piece r at rows r*m."""
    perm = wire_perm(x, dim)
    t = _to_front(x, perm)
    if any(s != m for s in sizes):
        parts, off = [], 0
        for s in sizes:
            parts.append(t[off:off + s])
            if s < m:
                parts.append(_zeros(t, m - s))
            off += s
        t = torch.cat(parts)
    return t.contiguous(), perm


def unpack_piece(t: torch.Tensor, s: int, perm: Sequence[int], fmt: torch.memory_format) -> torch.Tensor:
    """(m, *rest) -> this rank's piece of size ``s`` along the original dim."""
    if t.shape[0] != s:
        t = t[:s]
    return _restore(t, perm, fmt)
