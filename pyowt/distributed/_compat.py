"""The raw collectives under pyowt's autograd functions, across torch versions and backends.

All take tensors already laid out for the wire (dense, split dimension first, equal pieces;
see ``_packing``) and do no autograd and no accounting.

- Names: torch >= 2.13 calls the single-tensor collectives ``all_gather_single`` /
  ``reduce_scatter_single`` and makes the old ``all_gather_into_tensor`` /
  ``reduce_scatter_tensor`` warn (FutureWarning) on every call. Both pairs have the same
  signature ``(output, input, [op,] group=None, async_op=False)``; we bind the new name when
  it exists and the old one otherwise, once, at import, so no call ever warns.
- Reduce-scatter fallback: a backend without a native single-tensor reduce-scatter (Gloo
  before it gained one) raises "does not support" before any communication, identically on
  every rank; we then remember that for the backend and use all-reduce + a slice instead
  (twice the traffic, same result). ``_force_reduce_scatter_fallback`` exercises that path.
- Under ``torch.compile`` the eager c10d calls are not traceable with Python-side work
  handles, so the ``traced_*`` functions use ``torch.distributed._functional_collectives``
  (functional, graph-capturable ops; Inductor inserts the waits).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist

_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)

# backend name -> whether its native single-tensor reduce-scatter works.
_RS_NATIVE: Dict[str, bool] = {}
_AG_NATIVE: Dict[str, bool] = {}


def _force_reduce_scatter_fallback(backend: str, on: bool = True) -> None:
    """Testing hook: make ``backend`` use the all-reduce fallback (or the native call again)."""
    _RS_NATIVE[backend] = not on


_BACKENDS: Dict[object, str] = {}


def backend_of(group) -> str:
    """The backend name of ``group`` (cached: this is on every call's path)."""
    name = _BACKENDS.get(group)
    if name is None:
        name = _BACKENDS[group] = str(dist.get_backend(group))
    return name


def _unsupported(err: Exception) -> bool:
    msg = str(err).lower()
    return any(m in msg for m in ("not support", "no support", "unsupported", "not implemented"))


def is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return False  # pragma: no cover - torch < 2.3


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last(_3d) for such dense tensors, else contiguous_format."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def dense(x: torch.Tensor) -> bool:
    """Whether c10d accepts ``x`` as is (contiguous, or channels-last dense)."""
    return x.is_contiguous(memory_format=memory_format(x))


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """A dense buffer of x's shape, dtype, device and (channels-last or not) layout."""
    return torch.empty_like(x, memory_format=memory_format(x))


def dense_clone(x: torch.Tensor) -> torch.Tensor:
    """A private dense copy of ``x`` (keeps channels-last) for in-place collectives."""
    out = x.clone()
    return out if dense(out) else out.contiguous()


def all_gather(t: torch.Tensor, group, k: int, async_op: bool = False):
    """(m, *rest) on each rank -> (k*m, *rest), rank r's rows at [r*m, (r+1)*m). Returns (out, work)."""
    out = t.new_empty((k * t.shape[0],) + tuple(t.shape[1:]))
    backend = backend_of(group)
    if _AG_NATIVE.get(backend, True):
        try:
            return out, _ALL_GATHER(out, t, group=group, async_op=async_op)
        except RuntimeError as err:
            if not _unsupported(err):
                raise
            _AG_NATIVE[backend] = False
    return out, dist.all_gather(list(out.chunk(k)), t, group=group, async_op=async_op)


def reduce_scatter(t: torch.Tensor, group, k: int, rank: int, async_op: bool = False):
    """(k*m, *rest) on each rank -> sum over ranks of rows [r*m, (r+1)*m). Returns (out, work)."""
    m = t.shape[0] // k
    backend = backend_of(group)
    if _REDUCE_SCATTER is not None and _RS_NATIVE.get(backend, True):
        out = t.new_empty((m,) + tuple(t.shape[1:]))
        try:
            return out, _REDUCE_SCATTER(out, t, op=dist.ReduceOp.SUM, group=group, async_op=async_op)
        except RuntimeError as err:
            if not _unsupported(err):
                raise
            _RS_NATIVE[backend] = False
    buf = dense_clone(t)
    work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=async_op)
    # A view into buf: valid once work completes.
    return buf[rank * m:(rank + 1) * m], work


def all_reduce_(buf: torch.Tensor, group, async_op: bool = False):
    """Sum ``buf`` over the group, in place. Returns the work handle (None when sync)."""
    return dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


def broadcast_(buf: torch.Tensor, src_global: int, group, async_op: bool = False):
    """Overwrite ``buf`` with the source rank's ``buf``, in place."""
    return dist.broadcast(buf, src=src_global, group=group, async_op=async_op)


def reduce_(buf: torch.Tensor, dst_global: int, group, async_op: bool = False):
    """Sum ``buf`` over the group into the destination rank's ``buf``, in place."""
    return dist.reduce(buf, dst=dst_global, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


# ---- traceable (torch.compile) versions: functional collectives, group-local ranks ----

def _funcol():
    import torch.distributed._functional_collectives as funcol

    return funcol


def traced_all_gather(t: torch.Tensor, group) -> torch.Tensor:
    fc = _funcol()
    fn = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor
    return fc.wait_tensor(fn(t, 0, group))


def traced_reduce_scatter(t: torch.Tensor, group) -> torch.Tensor:
    fc = _funcol()
    fn = getattr(fc, "reduce_scatter_single", None) or fc.reduce_scatter_tensor
    return fc.wait_tensor(fn(t, "sum", 0, group))


def traced_all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    fc = _funcol()
    return fc.wait_tensor(fc.all_reduce(t, "sum", group))


def traced_broadcast(t: torch.Tensor, src: int, group) -> torch.Tensor:
    """``src`` is the rank within ``group`` (what the functional op's root rank means)."""
    fc = _funcol()
    return fc.wait_tensor(fc.broadcast(t, src, group))

