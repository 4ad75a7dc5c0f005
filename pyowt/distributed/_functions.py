"""The autograd functions, one per transition, on wire-layout tensors.

Each ``forward`` runs one collective and each ``backward`` its dual. Gathers and scatters
work on packed tensors (split dim first, K equal pieces; see ``_packing``) so that their
backward is a single collective too; the public wrappers in ``mappings`` pack and unpack
around them with ordinary differentiable ops.

``done``: ``None`` for a blocking call. The asynchronous variants launch the collective on
detached tensors themselves, wait, and then pass its result as ``done``: the function only
attaches it to the autograd graph. (Launching inside ``forward`` and returning the buffer
before completion does not work: Gloo copies results into the output buffer when the work
completes, and by then the buffer carries autograd history, so the copy is recorded and
cuts the gradient.) Backward collectives are always blocking.

Under torch.compile the traceable functional collectives replace the c10d calls and no
accounting happens (see ``accounting``).
"""
from __future__ import annotations

import torch
from torch.autograd import Function

from . import _compat
from .accounting import record

_c = _compat


def _note(kind, nbytes):
    if not _c.is_compiling():
        record(kind, *nbytes)


def _differentiable() -> bool:
    """True in a backward run under ``create_graph=True`` (gradients of gradients): the
    backward collective must then be recorded as its dual Function, so that the second
    derivative runs the dual's own backward collective. Every rank runs the same backward,
    so every rank takes the same branch and the collective sequences stay aligned. Under
    torch.compile the traced functional collectives are used as before."""
    return torch.is_grad_enabled() and not _c.is_compiling()


class AllGather(Function):
    """(m, *rest) per rank -> (K*m, *rest); backward reduce-scatter (grad "reduce_scatter")
    or this rank's slice (grad "split")."""

    @staticmethod
    def forward(ctx, t, group, k, rank, grad, nbytes, done):
        ctx.group, ctx.k, ctx.rank, ctx.grad, ctx.nbytes = group, k, rank, grad, nbytes
        if done is not None:
            return done
        _note("all_gather", nbytes)
        if k == 1:
            return t
        if _c.is_compiling():
            return _c.traced_all_gather(t.contiguous(), group)
        return _c.all_gather(t.contiguous(), group, k)[0]

    @staticmethod
    def backward(ctx, g):
        k, rank = ctx.k, ctx.rank
        if ctx.grad == "split":
            m = g.shape[0] // k
            if k > 1 and _differentiable():
                # This rank's slice, recorded as a split: differentiated again, the slices'
                # (Shard) gradients are all-gathered back into the Replicate one.
                return (Split.apply(g, 0, (m,) * k, ctx.group, k, rank, ctx.nbytes),
                        None, None, None, None, None, None)
            return g[rank * m:(rank + 1) * m], None, None, None, None, None, None
        if k > 1 and _differentiable():
            return (ReduceScatter.apply(g.contiguous(), ctx.group, k, rank, ctx.nbytes[::-1], None),
                    None, None, None, None, None, None)
        _note("reduce_scatter", ctx.nbytes[::-1])
        if k == 1:
            return g, None, None, None, None, None, None
        g = g.contiguous()
        if _c.is_compiling():
            return _c.traced_reduce_scatter(g, ctx.group), None, None, None, None, None, None
        out, _ = _c.reduce_scatter(g, ctx.group, k, rank)
        return out, None, None, None, None, None, None


class ReduceScatter(Function):
    """(K*m, *rest) per rank -> sum of everyone's rows [r*m, (r+1)*m); backward all-gather."""

    @staticmethod
    def forward(ctx, t, group, k, rank, nbytes, done):
        ctx.group, ctx.k, ctx.rank, ctx.nbytes = group, k, rank, nbytes
        if done is not None:
            return done
        _note("reduce_scatter", nbytes)
        if k == 1:
            return t
        if _c.is_compiling():
            return _c.traced_reduce_scatter(t.contiguous(), group)
        return _c.reduce_scatter(t.contiguous(), group, k, rank)[0]

    @staticmethod
    def backward(ctx, g):
        if ctx.k > 1 and _differentiable():
            return (AllGather.apply(g.contiguous(), ctx.group, ctx.k, ctx.rank, "reduce_scatter",
                                    ctx.nbytes[::-1], None), None, None, None, None, None)
        _note("all_gather", ctx.nbytes[::-1])
        if ctx.k == 1:
            return g, None, None, None, None, None
        g = g.contiguous()
        if _c.is_compiling():
            return _c.traced_all_gather(g, ctx.group), None, None, None, None, None
        out, _ = _c.all_gather(g, ctx.group, ctx.k)
        return out, None, None, None, None, None


class AllReduce(Function):
    """Sum over ranks (Partial -> Replicate); backward identity."""

    @staticmethod
    def forward(ctx, x, group, k, nbytes, done):
        ctx.group, ctx.k, ctx.nbytes = group, k, nbytes
        if done is not None:
            return done
        _note("all_reduce", nbytes)
        if k == 1:
            return x
        if _c.is_compiling():
            return _c.traced_all_reduce(x.contiguous(), group)
        buf = _c.dense_clone(x)
        _c.all_reduce_(buf, group)
        return buf

    @staticmethod
    def backward(ctx, g):
        if ctx.k > 1 and _differentiable():
            # The identity, recorded as a copy to the group: differentiated again, the
            # ranks' (Partial) gradients of g are summed into the Replicate one.
            return CopyToGroup.apply(g, ctx.group, ctx.k, ctx.nbytes), None, None, None, None
        return g, None, None, None, None


class CopyToGroup(Function):
    """Identity (Replicate in, every rank consumes it); backward all-reduce of the gradients."""

    @staticmethod
    def forward(ctx, x, group, k, nbytes):
        ctx.group, ctx.k, ctx.nbytes = group, k, nbytes
        return x

    @staticmethod
    def backward(ctx, g):
        if ctx.k > 1 and _differentiable():
            return AllReduce.apply(g, ctx.group, ctx.k, ctx.nbytes, None), None, None, None
        _note("all_reduce", ctx.nbytes)
        if ctx.k == 1:
            return g, None, None, None
        if _c.is_compiling():
            return _c.traced_all_reduce(g.contiguous(), ctx.group), None, None, None
        buf = _c.dense_clone(g)
        _c.all_reduce_(buf, ctx.group)
        return buf, None, None, None


class Broadcast(Function):
    """Everyone gets ``src``'s tensor; backward sums the gradients into ``src`` (None elsewhere)."""

    @staticmethod
    def forward(ctx, x, src, src_global, group, k, rank, nbytes, done):
        ctx.src, ctx.src_global, ctx.group, ctx.k, ctx.rank = src, src_global, group, k, rank
        ctx.nbytes = nbytes
        if done is not None:
            return done
        _note("broadcast", nbytes)
        if k == 1:
            return x
        if _c.is_compiling():
            return _c.traced_broadcast(x.contiguous(), src, group)
        if rank == src:
            buf = x if _c.dense(x) else x.contiguous()  # only read: no copy needed
        else:
            buf = _c.empty_like(x)
        _c.broadcast_(buf, src_global, group)
        return buf

    @staticmethod
    def backward(ctx, g):
        sent, received = ctx.nbytes
        none = (None,) * 7
        if ctx.k > 1 and _differentiable():
            summed = ReduceTo.apply(g, ctx.src, ctx.src_global, ctx.group, ctx.k, ctx.rank,
                                    (received, sent))
            if ctx.rank == ctx.src:
                return (summed,) + none
            # This rank's x is unused (gradient zero), but its gradient must stay attached to
            # the graph: differentiating it again runs ReduceTo's backward broadcast, which
            # every rank has to join (with None here, only the source rank could). where()
            # passes a zero derivative without reading the unspecified sum.
            return (torch.where(torch.zeros((), dtype=torch.bool, device=g.device), summed, 0.0),) + none
        _note("reduce", (received, sent))
        if ctx.k == 1:
            return (g,) + none
        if _c.is_compiling():
            # No functional reduce: an all-reduce gives src the same sum. Elsewhere its
            # result must still be used, or the graph drops the collective on those ranks
            # only and the ranks' collective sequences diverge (a hang). x * 0 is not folded.
            summed = _c.traced_all_reduce(g.contiguous(), ctx.group)
            return (summed if ctx.rank == ctx.src else summed * 0,) + none
        summed = _c.dense_clone(g)
        _c.reduce_(summed, ctx.src_global, ctx.group)
        return (summed if ctx.rank == ctx.src else None,) + none


class ReduceTo(Function):
    """Sum over ranks into ``dst`` (other ranks' outputs unspecified); backward broadcast from dst."""

    @staticmethod
    def forward(ctx, x, dst, dst_global, group, k, rank, nbytes):
        ctx.dst, ctx.dst_global, ctx.group, ctx.k, ctx.rank = dst, dst_global, group, k, rank
        ctx.nbytes = nbytes
        _note("reduce", nbytes)
        if k == 1:
            return x
        if _c.is_compiling():
            # No functional reduce exists; an all-reduce gives dst the same sum (the other
            # ranks' outputs are unspecified anyway) at twice the traffic.
            return _c.traced_all_reduce(x.contiguous(), group)
        buf = _c.dense_clone(x)
        _c.reduce_(buf, dst_global, group)
        return buf

    @staticmethod
    def backward(ctx, g):
        sent, received = ctx.nbytes
        none = (None,) * 6
        if ctx.k > 1 and _differentiable():
            return (Broadcast.apply(g, ctx.dst, ctx.dst_global, ctx.group, ctx.k, ctx.rank,
                                    (received, sent), None),) + none
        _note("broadcast", (received, sent))
        if ctx.k == 1:
            return (g,) + none
        if _c.is_compiling():
            return (_c.traced_broadcast(g.contiguous(), ctx.dst, ctx.group),) + none
        if ctx.rank == ctx.dst:
            buf = g if _c.dense(g) else g.contiguous()
        else:
            buf = _c.empty_like(g)
        _c.broadcast_(buf, ctx.dst_global, ctx.group)
        return (buf,) + none


class Split(Function):
    """This rank's piece along ``dim`` (Replicate -> Shard); backward all-gather of the pieces."""

    @staticmethod
    def forward(ctx, x, dim, sizes, group, k, rank, nbytes):
        ctx.dim, ctx.sizes, ctx.group, ctx.k, ctx.rank, ctx.nbytes = dim, sizes, group, k, rank, nbytes
        ctx.order = None
        off = sum(sizes[:rank])
        # A copy, not a view: a view returned from a custom Function cannot be modified in
        # place later (e.g. by an inplace ReLU), and the piece is only 1/K of x.
        return x.narrow(dim, off, sizes[rank]).clone()

    @staticmethod
    def backward(ctx, g):
        from ._packing import pack_piece, unpack_gathered

        none = (None,) * 6
        if ctx.k == 1:
            _note("all_gather", ctx.nbytes)
            return (g,) + none
        m = max(ctx.sizes)
        t, perm = pack_piece(g, ctx.dim, m)
        if _differentiable():
            # The pieces' gathering, recorded: its own backward takes this rank's piece back.
            buf = AllGather.apply(t, ctx.group, ctx.k, ctx.rank, "split", ctx.nbytes, None)
            return (unpack_gathered(buf, ctx.sizes, m, perm, _c.memory_format(g)),) + none
        _note("all_gather", ctx.nbytes)
        if _c.is_compiling():
            buf = _c.traced_all_gather(t, ctx.group)
        else:
            buf, _ = _c.all_gather(t, ctx.group, ctx.k)
        return (unpack_gathered(buf, ctx.sizes, m, perm, _c.memory_format(g)),) + none
