"""Asynchronous variants: start a collective, compute, then ``wait()`` for its result.

::

    pending = pyowt.distributed.broadcast_async(rows_next, src=j + 1)
    loss_j = head(rows_j)              # runs while the broadcast is in flight
    rows_next = pending.wait()         # the broadcast tensor, differentiable as usual

Each function takes the same arguments as its blocking twin in :mod:`~pyowt.distributed.mappings`
and returns a :class:`Pending`; ``Pending.wait()`` returns exactly what the blocking call
would have (same values, same autograd graph and backward, same accounting). Until then do
not modify the input (it may still be read) and do not use its storage elsewhere. The
backward collectives are blocking. With NCCL, ``wait()`` makes the current CUDA stream wait
for the collective; the host does not block.

Not traceable by torch.compile (a Python-side work handle cannot live in a graph): inside a
compiled region use the blocking functions, which compile to functional collectives that
the compiler itself reorders to overlap with computation.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from . import _compat, _functions as F
from .accounting import record
from .mappings import _prepare_all_reduce, _prepare_broadcast, _prepare_gather, _prepare_scatter

__all__ = ["Pending", "all_gather_async", "reduce_scatter_async", "all_reduce_async",
           "broadcast_async", "all_reduce_inplace"]


class Pending:
    """A collective in flight; :meth:`wait` returns its result (later calls return it again)."""

    def __init__(self, work, attach: Callable[[], torch.Tensor], keep=()):
        # keep: tensors the in-flight collective reads or writes, alive until it completes.
        self._work, self._attach, self._keep = work, attach, keep
        self._result: Optional[torch.Tensor] = None

    def is_completed(self) -> bool:
        """True when the collective finished (or when there was nothing to wait for)."""
        return self._result is not None or self._work is None or self._work.is_completed()

    def wait(self) -> torch.Tensor:
        if self._result is None:
            if self._work is not None:
                self._work.wait()
            self._result = self._attach()
            self._work = self._attach = None
            self._keep = ()
        return self._result


def _no_compile(fn: str) -> None:
    if _compat.is_compiling():
        raise RuntimeError(f"{fn} cannot be traced by torch.compile; use the blocking variant")


def all_gather_async(x: torch.Tensor, dim: int = 0, group=None, grad: str = "reduce_scatter", *,
                     sizes: Optional[Sequence[int]] = None) -> Pending:
    """:func:`~pyowt.distributed.all_gather`, started now; ``wait()`` returns ``(..., sum(n_r), ...)``.

    Without ``sizes`` the (blocking, small) shape exchange runs first, as in the blocking call.
    """
    fn = "pyowt.distributed.all_gather_async"
    _no_compile(fn)
    t, pg, k, rank, nbytes, finish = _prepare_gather(x, dim, group, grad, sizes, fn)
    wire = t.detach().contiguous()
    out, work = _compat.all_gather(wire, pg, k, async_op=True) if k > 1 else (wire, None)
    record("all_gather", *nbytes)
    return Pending(work, lambda: finish(F.AllGather.apply(t, pg, k, rank, grad, nbytes, out)), (wire, out))


def reduce_scatter_async(x: torch.Tensor, dim: int = 0, group=None) -> Pending:
    """:func:`~pyowt.distributed.reduce_scatter`, started now; ``wait()`` returns ``(..., n_r, ...)``."""
    fn = "pyowt.distributed.reduce_scatter_async"
    _no_compile(fn)
    t, pg, k, rank, nbytes, finish = _prepare_scatter(x, dim, group, fn)
    wire = t.detach().contiguous()
    out, work = _compat.reduce_scatter(wire, pg, k, rank, async_op=True) if k > 1 else (wire, None)
    record("reduce_scatter", *nbytes)
    return Pending(work, lambda: finish(F.ReduceScatter.apply(t, pg, k, rank, nbytes, out)), (wire, out))


def all_reduce_async(x: torch.Tensor, group=None) -> Pending:
    """:func:`~pyowt.distributed.all_reduce`, started now; ``wait()`` returns the sum (``x``'s shape)."""
    fn = "pyowt.distributed.all_reduce_async"
    _no_compile(fn)
    pg, k, nbytes = _prepare_all_reduce(x, group, fn)
    buf = _compat.dense_clone(x.detach())
    work = _compat.all_reduce_(buf, pg, async_op=True) if k > 1 else None
    record("all_reduce", *nbytes)
    return Pending(work, lambda: F.AllReduce.apply(x, pg, k, nbytes, buf), (buf,))


def broadcast_async(x: torch.Tensor, src: int, group=None) -> Pending:
    """:func:`~pyowt.distributed.broadcast`, started now; ``wait()`` returns ``src``'s tensor."""
    fn = "pyowt.distributed.broadcast_async"
    _no_compile(fn)
    pg, k, rank, src, src_g, nbytes = _prepare_broadcast(x, src, group, fn)
    if rank == src:
        buf = x.detach() if _compat.dense(x) else x.detach().contiguous()
    else:
        buf = _compat.empty_like(x)
    work = _compat.broadcast_(buf, src_g, pg, async_op=True) if k > 1 else None
    record("broadcast", *nbytes)
    return Pending(work, lambda: F.Broadcast.apply(x, src, src_g, pg, k, rank, nbytes, buf), (buf,))


def all_reduce_inplace(buf: torch.Tensor, group=None, async_op: bool = False):
    """Sum ``buf`` over the group in place: no autograd, no copy (gradient buckets).

    ``buf`` must be dense and not require grad. Returns the work handle when ``async_op``
    (``wait()`` it before reading ``buf``), else None. Counted as an ``all_reduce``.
    """
    fn = "pyowt.distributed.all_reduce_inplace"
    if buf.requires_grad:
        raise ValueError(f"{fn}: buf must not require grad (it is summed in place)")
    if not _compat.dense(buf):
        raise ValueError(f"{fn}: buf must be dense, got strides {tuple(buf.stride())} for shape {tuple(buf.shape)}")
    pg, k, nbytes = _prepare_all_reduce(buf, group, fn)
    record("all_reduce", *nbytes)
    if k == 1:
        return None
    return _compat.all_reduce_(buf, pg, async_op=async_op)
