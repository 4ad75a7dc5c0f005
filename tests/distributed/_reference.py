"""Inputs every rank can regenerate, and the single-process math the collectives must match.

Each rank's input is a pure function of (case, rank), so every worker computes the whole
single-process reference locally, in float64 from the same dtype-rounded values.
"""
from __future__ import annotations

import torch

from ..utils import REL_TOL, rel_err


def rand(shape, seed, dtype=torch.float32, layout="contig"):
    """Fresh normal values of ``shape`` in a given memory layout."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    if layout == "contig":
        t = torch.randn(shape, generator=g)
    elif layout == "transposed":  # dense, dims in reverse memory order
        t = torch.randn(shape[::-1], generator=g).permute(*reversed(range(len(shape))))
    elif layout == "strided":  # not dense: every other element of the last dim
        t = torch.randn(shape[:-1] + (2 * shape[-1],), generator=g)[..., ::2]
    elif layout == "channels_last":
        t = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    else:
        raise ValueError(layout)
    return t.to(dtype)


def pieces(total, k):
    """Per-rank sizes of torch.tensor_split, computed by torch itself."""
    return [len(c) for c in torch.arange(total).tensor_split(k)]


def shape_with(base, dim, n):
    s = list(base)
    s[dim] = n
    return tuple(s)


def check_exact(out, ref, what):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    assert torch.equal(out, ref), f"{what}: values differ (max |diff| {(out.double() - ref.double()).abs().max()})"


def check_close(out, ref, dtype, what):
    assert out is not None, f"{what}: missing (None)"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3g} > {REL_TOL[dtype]:g}"
