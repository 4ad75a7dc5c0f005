"""Argument checks, and the cross-rank shape agreement that turns mismatches into errors.

Local mistakes (a dim out of range, a bad ``grad`` mode, a dtype the backend cannot reduce)
raise ``ValueError`` / ``TypeError`` naming the value before any communication.

Ranks that disagree on shape are the dangerous case: a collective over buffers of different
sizes hangs until the process-group timeout, returns garbage, or (Gloo) aborts the process.
The shape exchange all-gathers a small fixed-size int64 record (collective kind, dtype, dim,
shape) first; every rank then sees the same table and, on disagreement, every rank raises
the same ``ValueError``. When it runs is set by :func:`set_shape_check`:

- ``"auto"`` (default): where the per-rank sizes are not otherwise known, i.e.
  :func:`all_gather` without ``sizes=`` (the exchange is what tells each rank the others'
  sizes, so uneven gathers just work);
- ``"always"``: before every forward collective (debugging; one extra small collective each);
- ``"never"``: nowhere; :func:`all_gather` without ``sizes=`` then assumes every rank holds
  as many rows as this one.

The environment variable ``PYOWT_SHAPE_CHECK`` sets the initial mode. Backward collectives
are never checked: their shapes follow from the forward, which agreed.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch

from . import _compat
from .accounting import all_gather_bytes, record

_MODES = ("auto", "always", "never")
_mode = os.environ.get("PYOWT_SHAPE_CHECK", "auto")
if _mode not in _MODES:  # a bad environment value is a user error too
    raise ValueError(f"PYOWT_SHAPE_CHECK must be one of {_MODES}, got {_mode!r}")

# Dtypes the reducing collectives accept (sum is meaningful and NCCL and Gloo implement it).
REDUCIBLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64,
             torch.int8, torch.uint8, torch.int32, torch.int64)
GRAD_MODES = ("reduce_scatter", "split")

_KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast", "reduce", "split", "copy_to_group")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
           torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)
_MAX_DIMS = 32
_HEADER = 4  # kind, dtype, dim, ndim


def set_shape_check(mode: str) -> str:
    """Set when ranks exchange shapes before a collective (see module docstring); returns the old mode."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"shape check mode must be one of {_MODES}, got {mode!r}")
    old, _mode = _mode, mode
    return old


def get_shape_check() -> str:
    return _mode


def check_tensor(x, fn: str, arg: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(x).__name__}")


def check_dim(dim, ndim: int, fn: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{fn}: dim must be an int, got {type(dim).__name__}")
    if ndim < 1:
        raise ValueError(f"{fn}: x must have at least 1 dimension to split or gather, got a 0-d tensor")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{fn}: dim must be in [{-ndim}, {ndim - 1}] for a {ndim}-d tensor, got {dim}")
    return dim % ndim


def check_reducible(x: torch.Tensor, fn: str, backend: str) -> None:
    if x.dtype not in REDUCIBLE:
        names = ", ".join(str(d).replace("torch.", "") for d in REDUCIBLE)
        raise TypeError(f"{fn}: backend '{backend}' cannot sum-reduce dtype {x.dtype} here "
                        f"(supported: {names})")


def check_grad_mode(grad, fn: str) -> None:
    if grad not in GRAD_MODES:
        raise ValueError(f"{fn}: grad must be one of {GRAD_MODES}, got {grad!r}")


def check_rank(value, k: int, fn: str, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {arg} must be an int (a rank within the group), got {type(value).__name__}")
    if not 0 <= value < k:
        raise ValueError(f"{fn}: {arg} must be a rank in the group, 0..{k - 1}, got {value}")
    return value


def check_sizes(sizes, k: int, rank: int, local: int, fn: str) -> List[int]:
    try:
        out = [int(s) for s in sizes]
    except TypeError:
        raise TypeError(f"{fn}: sizes must be a sequence of {k} ints, got {type(sizes).__name__}") from None
    if len(out) != k or any(s < 0 for s in out) or any(isinstance(s, bool) for s in sizes):
        raise ValueError(f"{fn}: sizes must be {k} non-negative ints (one per rank), got {list(sizes)}")
    if out[rank] != local:
        raise ValueError(f"{fn}: sizes[{rank}] = {out[rank]} but this rank's x has {local} along dim")
    return out


def exchange_shapes(x: torch.Tensor, kind: str, dim: Optional[int], group, k: int, rank: int,
                    fn: str) -> List[List[int]]:
    """All-gather (kind, dtype, dim, shape) and raise on every rank if ranks disagree.

    Returns every rank's shape. ``dim`` is the gather dim (sizes along it may differ) or
    None (shapes must match exactly).
    """
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"{fn}: at most {_MAX_DIMS} dims supported, got {x.dim()}")
    code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else len(_DTYPES)
    row = [_KINDS.index(kind), code, -1 if dim is None else dim, x.dim()] + list(x.shape)
    row += [-1] * (_HEADER + _MAX_DIMS - len(row))
    meta = torch.tensor(row, dtype=torch.int64, device=x.device)
    table, _ = _compat.all_gather(meta, group, k)
    record("shape_exchange", *all_gather_bytes([meta.numel()] * k, rank, meta.element_size()))
    rows = table.view(k, -1).tolist()
    shapes = [r[_HEADER:_HEADER + r[3]] for r in rows]

    def describe():
        parts = []
        for r, row_ in enumerate(rows):
            kname = _KINDS[row_[0]] if 0 <= row_[0] < len(_KINDS) else "?"
            dname = str(_DTYPES[row_[1]]) if 0 <= row_[1] < len(_DTYPES) else "other dtype"
            parts.append(f"rank {r}: {kname} shape {tuple(shapes[r])} {dname}"
                         + ("" if row_[2] < 0 else f" dim {row_[2]}"))
        return "; ".join(parts)

    if len({tuple(r[:_HEADER]) for r in rows}) > 1:
        raise ValueError(f"{fn}: ranks disagree on collective, dtype, dim or rank count: {describe()}")
    if dim is None:
        bad = len({tuple(s) for s in shapes}) > 1
    else:
        bad = len({tuple(s[:dim] + s[dim + 1:]) for s in shapes}) > 1
    if bad:
        what = "shape" if dim is None else f"sizes of the dims other than {dim}"
        raise ValueError(f"{fn}: ranks disagree on the {what}: {describe()}")
    return shapes


def want_check(sizes_known: bool) -> bool:
    """Whether to run the exchange now (never while torch.compile traces: it needs .tolist())."""
    if _compat.is_compiling():
        return False
    return _mode == "always" or (_mode == "auto" and not sizes_known)


def gathered_sizes(x: torch.Tensor, dim: int, sizes: Optional[Sequence[int]], group, k: int,
                   rank: int, fn: str) -> List[int]:
    """Per-rank sizes along ``dim`` for a gather: given, exchanged, or assumed equal."""
    local = x.shape[dim]
    if sizes is not None:
        sizes = check_sizes(sizes, k, rank, local, fn)
    if k > 1 and want_check(sizes is not None):
        found = [s[dim] for s in exchange_shapes(x, "all_gather", dim, group, k, rank, fn)]
        if sizes is not None and found != sizes:
            raise ValueError(f"{fn}: sizes={sizes} but the ranks hold {found} along dim {dim}")
        return found
    return sizes if sizes is not None else [local] * k
