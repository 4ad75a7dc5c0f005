"""Layout transitions as autograd functions: each forward is one collective, each backward its dual.

K is the size of ``group`` and r this rank's index in it. A tensor *split along dim* has
per-rank sizes as ``torch.tensor_split`` gives (the first N mod K ranks hold one more row);
:func:`all_gather` also accepts any per-rank sizes.

==========================  ====================  ==============================  ============
function                    layouts               forward                         backward
==========================  ====================  ==============================  ============
``all_gather(grad=...)``    Shard -> Replicate    all-gather                      reduce-scatter
                                                                                  (Partial grad)
                                                                                  or own slice
                                                                                  (Replicate)
``reduce_scatter``          Partial -> Shard      reduce-scatter (sum)            all-gather
``all_reduce``              Partial -> Replicate  all-reduce (sum)                identity
``split``                   Replicate -> Shard    own slice, no communication     all-gather
``copy_to_group``           Replicate (used by    identity                        all-reduce
                            every rank)
``broadcast``               one rank -> all       broadcast from ``src``          sum to src
``reduce_to``               all -> one rank       sum to ``dst``                  broadcast
==========================  ====================  ==============================  ============

Getting the backward wrong scales gradients by K: pick ``all_gather``'s ``grad`` by what
the consumer's gradient is (``"reduce_scatter"`` after a split-weight layer, whose gradient
is a Partial sum; ``"split"`` when every rank computes the same, replicated gradient).

Gradients of gradients (``create_graph=True``) across ranks work: under create_graph each
backward is recorded as its dual transition (``all_gather``'s reduce-scatter as a
``reduce_scatter``, ``broadcast``'s reduce as a ``reduce_to``, ``all_reduce``'s identity as
a ``copy_to_group``, ``all_gather(grad="split")``'s slice as a ``split``, ...), so
differentiating the gradient runs the dual's own backward collective. (A plain identity or
slice there would be differentiable but wrong: the second derivative of a gradient penalty
through a column -> row parallel stack was 26-43% off that way.) As for first derivatives, every rank
must differentiate the same graph (a Replicate gradient, e.g. after ``copy_to_group``,
consumed identically on every rank); ``broadcast`` gives its non-source ranks a zero
gradient attached to the graph (not None) so that they can join the second derivative's
collective (torch.compile itself does not support double backward).

Every function validates its input (TypeError / ValueError naming the value), works on CPU
(Gloo) and CUDA (NCCL) tensors of any memory layout (allocating on the input's device;
channels-last stays channels-last), and records its traffic for
:func:`pyowt.distributed.comm_stats`.

torch.compile: a module calling these functions compiles with ``fullgraph=True`` (tested
on Gloo with the ``aot_eager`` and ``inductor`` backends). While traced, the autograd
functions run ``torch.distributed._functional_collectives`` instead of the c10d calls, and:

- no accounting (Python bookkeeping cannot run inside a graph) and no shape exchange (its
  ``.tolist()`` is data-dependent): an :func:`all_gather` without ``sizes`` assumes equal
  pieces, so pass ``sizes`` for uneven gathers;
- there is no functional reduce, so :func:`reduce_to` and the backward of
  :func:`broadcast` use an all-reduce (the destination gets the same sum; twice the
  traffic); the non-source ranks of :func:`broadcast` then get a zero gradient instead of
  None (a None would let the graph drop the collective on those ranks only, and ranks whose
  collective sequences differ hang);
- the ``*_async`` variants raise (a work handle cannot live in a graph); the compiler
  overlaps functional collectives by itself.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _checks, _functions as F
from ._compat import backend_of
from ._compat import memory_format
from ._packing import pack_full, pack_piece, unpack_gathered, unpack_piece
from .accounting import (all_gather_bytes, all_reduce_bytes, broadcast_bytes, reduce_bytes,
                         reduce_scatter_bytes, split_sizes)
from .groups import global_rank, resolve_group

__all__ = ["all_gather", "reduce_scatter", "all_reduce", "split", "copy_to_group",
           "broadcast", "reduce_to"]


def _group_info(group):
    pg = resolve_group(group)  # raises unless this rank is a member
    return pg, pg.size(), pg.rank()


def _row_bytes(x: torch.Tensor, dim: int) -> int:
    """Bytes of one slice of ``x`` along ``dim``."""
    n = x.element_size()
    for i, s in enumerate(x.shape):
        if i != dim:
            n *= s
    return n


def _maybe_check_full(x, kind, group, k, rank, fn):
    """Exchange shapes before a collective whose shapes must match (mode ``"always"``)."""
    if k > 1 and _checks.want_check(sizes_known=True):
        _checks.exchange_shapes(x, kind, None, group, k, rank, fn)


# ---- packed-layout building blocks shared with the async variants -------------------------

def _prepare_gather(x, dim, group, grad, sizes, fn):
    _checks.check_tensor(x, fn)
    _checks.check_grad_mode(grad, fn)
    dim = _checks.check_dim(dim, x.dim(), fn)
    pg, k, rank = _group_info(group)
    if grad == "reduce_scatter" and x.requires_grad:
        _checks.check_reducible(x, fn, backend_of(pg))
    sizes = _checks.gathered_sizes(x, dim, sizes, pg, k, rank, fn)
    m = max(sizes)
    t, perm = pack_piece(x, dim, m)
    nbytes = all_gather_bytes(sizes, rank, _row_bytes(x, dim))
    finish = lambda buf: unpack_gathered(buf, sizes, m, perm, memory_format(x))  # noqa: E731
    return t, pg, k, rank, nbytes, finish


def _prepare_scatter(x, dim, group, fn):
    _checks.check_tensor(x, fn)
    dim = _checks.check_dim(dim, x.dim(), fn)
    pg, k, rank = _group_info(group)
    _checks.check_reducible(x, fn, backend_of(pg))
    _maybe_check_full(x, "reduce_scatter", pg, k, rank, fn)
    sizes = split_sizes(x.shape[dim], k)
    m = max(sizes)
    t, perm = pack_full(x, dim, sizes, m)
    nbytes = reduce_scatter_bytes(sizes, rank, _row_bytes(x, dim))
    finish = lambda out: unpack_piece(out, sizes[rank], perm, memory_format(x))  # noqa: E731
    return t, pg, k, rank, nbytes, finish


def _prepare_all_reduce(x, group, fn):
    _checks.check_tensor(x, fn)
    pg, k, rank = _group_info(group)
    _checks.check_reducible(x, fn, backend_of(pg))
    _maybe_check_full(x, "all_reduce", pg, k, rank, fn)
    return pg, k, all_reduce_bytes(x.numel(), k, rank, x.element_size())


def _prepare_broadcast(x, src, group, fn, kind="broadcast", arg="src"):
    _checks.check_tensor(x, fn)
    pg, k, rank = _group_info(group)
    src = _checks.check_rank(src, k, fn, arg)
    if kind == "reduce":
        _checks.check_reducible(x, fn, backend_of(pg))
    _maybe_check_full(x, kind, pg, k, rank, fn)
    nbytes = x.numel() * x.element_size()
    counts = (broadcast_bytes if kind == "broadcast" else reduce_bytes)(nbytes, k, rank, src)
    return pg, k, rank, src, global_rank(pg, src), counts


# ---- public functions --------------------------------------------------------------------

def all_gather(x: torch.Tensor, dim: int = 0, group=None, grad: str = "reduce_scatter", *,
               sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (Shard -> Replicate).

    Args:
        x: this rank's piece, shape ``(..., n_r, ...)`` with ``n_r`` at ``dim``; the other
            dims, the dtype and the device kind must agree across ranks.
        dim: the dimension to concatenate along.
        group: None (world), a ProcessGroup or a 1-D DeviceMesh; K ranks.
        grad: the backward. ``"reduce_scatter"``: the consumer's gradient is Partial (each
            rank holds a summand), so the gradient of ``x`` is the sum over ranks of the
            matching slice. ``"split"``: the consumer's gradient is Replicate (identical on
            every rank), so the gradient of ``x`` is this rank's slice of it.
        sizes: the K per-rank sizes ``n_0..n_{K-1}`` along ``dim`` when the caller knows
            them (e.g. ``split_sizes(N, K)``); they skip the shape exchange. If None, the
            ranks exchange shapes first (a small extra all-gather; mismatched shapes then
            raise ValueError on every rank), unless :func:`set_shape_check` is ``"never"``
            or the call is traced by torch.compile: then every rank is assumed to hold
            ``x.shape[dim]`` rows. Pass ``sizes`` for uneven gathers under torch.compile.

    Returns:
        ``(..., sum(n_r), ...)``, rank r's piece at offset ``n_0 + ... + n_{r-1}``, in
        ``x``'s memory format (channels-last stays channels-last).
    """
    fn = "pyowt.distributed.all_gather"
    t, pg, k, rank, nbytes, finish = _prepare_gather(x, dim, group, grad, sizes, fn)
    return finish(F.AllGather.apply(t, pg, k, rank, grad, nbytes, None))


def reduce_scatter(x: torch.Tensor, dim: int = 0, group=None) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's piece along ``dim`` (Partial -> Shard).

    Args:
        x: a summand of the full tensor, shape ``(..., N, ...)`` with ``N`` at ``dim``,
            the same shape on every rank.
        dim: the dimension to split; piece sizes follow ``torch.tensor_split(N, K)``.
        group: None (world), a ProcessGroup or a 1-D DeviceMesh.

    Returns:
        ``(..., n_r, ...)``: rows ``n_0 + ... + n_{r-1}`` onward of the sum over ranks.
        Backward: all-gather of the pieces' gradients.
    """
    fn = "pyowt.distributed.reduce_scatter"
    t, pg, k, rank, nbytes, finish = _prepare_scatter(x, dim, group, fn)
    return finish(F.ReduceScatter.apply(t, pg, k, rank, nbytes, None))


def all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``x`` (any shape, the same on every rank) over ranks (Partial -> Replicate).

    Returns a new tensor of ``x``'s shape. Backward: identity (the consumer's gradient of a
    Replicate tensor is the same on every rank, and each rank's ``x`` enters the sum once).
    """
    fn = "pyowt.distributed.all_reduce"
    pg, k, nbytes = _prepare_all_reduce(x, group, fn)
    return F.AllReduce.apply(x, pg, k, nbytes, None)


def split(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """This rank's piece of ``x`` along ``dim`` (Replicate -> Shard), no communication.

    Args:
        x: the full tensor ``(..., N, ...)``, identical on every rank.
        dim: the dimension to split; piece sizes follow ``torch.tensor_split(N, K)``.

    Returns:
        ``(..., n_r, ...)``, a copy. Backward: all-gather of the pieces' gradients.
    """
    fn = "pyowt.distributed.split"
    _checks.check_tensor(x, fn)
    dim = _checks.check_dim(dim, x.dim(), fn)
    pg, k, rank = _group_info(group)
    _maybe_check_full(x, "split", pg, k, rank, fn)
    sizes = split_sizes(x.shape[dim], k)
    nbytes = all_gather_bytes(sizes, rank, _row_bytes(x, dim))
    return F.Split.apply(x, dim, tuple(sizes), pg, k, rank, nbytes)


def copy_to_group(x: torch.Tensor, group=None) -> torch.Tensor:
    """Identity on ``x`` (any shape), whose backward all-reduces (sums) the gradient.

    Use it where a replicated tensor enters computation that every rank does differently
    (e.g. the input of a column-split layer): each rank's gradient is then a summand.
    """
    fn = "pyowt.distributed.copy_to_group"
    _checks.check_tensor(x, fn)
    pg, k, rank = _group_info(group)
    if x.requires_grad:
        _checks.check_reducible(x, fn, backend_of(pg))
    _maybe_check_full(x, "copy_to_group", pg, k, rank, fn)
    return F.CopyToGroup.apply(x, pg, k, all_reduce_bytes(x.numel(), k, rank, x.element_size()))


def broadcast(x: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Every rank gets ``src``'s ``x`` (``src`` is a rank within ``group``, 0..K-1).

    Args:
        x: on ``src`` the data; elsewhere any tensor of the same shape and dtype (its values
            are ignored, e.g. ``torch.empty``).

    Returns:
        ``x``'s shape, ``src``'s values (on ``src`` itself a view of ``x``, no copy).
        Backward: the gradients of every rank are summed into ``src``'s ``x`` (a reduce);
        the other ranks' ``x`` get no gradient (None).
    """
    fn = "pyowt.distributed.broadcast"
    pg, k, rank, src, src_g, nbytes = _prepare_broadcast(x, src, group, fn)
    return F.Broadcast.apply(x, src, src_g, pg, k, rank, nbytes, None)


def reduce_to(x: torch.Tensor, dst: int, group=None) -> torch.Tensor:
    """Sum ``x`` (same shape on every rank) over ranks into rank ``dst`` of ``group``.

    Returns:
        On ``dst``, the sum, shape of ``x``. On the other ranks a tensor of that shape whose
        values are unspecified (do not read them; their gradients are ignored).
        Backward: ``dst``'s gradient is broadcast, so every rank's ``x`` gets it.
    The dual of :func:`broadcast` (OWT scheme (b): the rows worker j broadcast come back
    as gradient summed at j).
    """
    fn = "pyowt.distributed.reduce_to"
    pg, k, rank, dst, dst_g, nbytes = _prepare_broadcast(x, dst, group, fn, kind="reduce", arg="dst")
    return F.ReduceTo.apply(x, dst, dst_g, pg, k, rank, nbytes)

