"""Functional forms of pyowt's parallel layers: the class-parallel cross-entropy.

``parallel_cross_entropy`` computes softmax cross-entropy over logits that are sharded by
class across the K ranks of a group (rank r holds classes ``off_r .. off_r + n_r - 1``, the
sizes of ``torch.tensor_split(C, K)``), without ever gathering the logits. Per row i:

    m_i   = max over all classes (all-reduce MAX, no gradient: any constant works, it only
            keeps exp() in range)
    S_i   = sum_c exp(z_ic - m_i)       (all-reduce SUM of each rank's partial sum)
    z_it  = the target's logit          (all-reduce SUM; only its owner contributes)
    loss_i = log S_i + m_i - z_it

The gradient with respect to rank r's shard is local and exact,
``(softmax(z)_shard - onehot(t)_shard) * dloss_i``, so the backward needs no communication.
Two all-reduces in the forward: ``B + K`` floats (the row maxima, plus every rank's shard
size so that each rank learns its class offset and all ranks validate the same layout) and
``2B`` floats (S and z_t), in float32 for half-precision logits.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist

from .. import distributed as pdist
from ..distributed.accounting import all_reduce_bytes, record, split_sizes

__all__ = ["parallel_cross_entropy", "parallel_cross_entropy_comm"]

REDUCTIONS = ("mean", "sum", "none")


def parallel_cross_entropy_comm(batch: int, k: int) -> List[Tuple[str, int]]:
    """The collectives one :func:`parallel_cross_entropy` call issues, as (kind, numel).

    ``numel`` counts elements of the compute dtype (float32 for float32/16/bf16 logits);
    byte counts follow with :func:`pyowt.distributed.accounting.all_reduce_bytes`.
    """
    return [("all_reduce", batch + k), ("all_reduce", 2 * batch)]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _all_reduce_max_(buf: torch.Tensor, pg, k: int, rank: int) -> None:
    # pyowt.distributed.all_reduce sums; the maximum needs ReduceOp.MAX. It carries no
    # gradient, so the plain c10d call suffices; its traffic is recorded like the others.
    if not torch.compiler.is_compiling():
        record("all_reduce", *all_reduce_bytes(buf.numel(), k, rank, buf.element_size()))
    if k > 1:
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=pg)


def _class_offset(sizes: List[int], k: int, rank: int) -> Tuple[int, int]:
    """(offset of this rank's classes, C) from every rank's shard size; the same error on
    every rank if the sizes are not those of ``torch.tensor_split(C, K)``."""
    total = sum(sizes)
    expected = split_sizes(total, k)
    if sizes != expected:
        raise ValueError(
            f"parallel_cross_entropy: logits shards of sizes {sizes} over {k} ranks do not "
            f"split {total} classes as torch.tensor_split does ({expected})")
    return sum(sizes[:rank]), total


class _ParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, pg, k, rank, reduction, ignore_index):
        z = logits.to(_compute_dtype(logits.dtype))
        b, n = z.shape
        buf = z.new_zeros(b + k)
        buf[:b] = z.amax(dim=1) if n > 0 else float("-inf")
        buf[b + rank] = n
        _all_reduce_max_(buf, pg, k, rank)
        row_max = buf[:b]
        sizes = [int(s) for s in buf[b:].tolist()]
        offset, num_classes = _class_offset(sizes, k, rank)

        valid = target != ignore_index
        bad = valid & ((target < 0) | (target >= num_classes))
        if bool(bad.any()):
            first = int(target[bad][0])
            raise ValueError(f"parallel_cross_entropy: target holds {first}, outside [0, {num_classes}) "
                             f"(the classes of all {k} shards; ignore_index={ignore_index})")
        local_t = target - offset
        mine = valid & (local_t >= 0) & (local_t < n)
        idx = torch.where(mine, local_t, torch.zeros_like(local_t))
        partial = torch.empty(2 * b, dtype=z.dtype, device=z.device)
        partial[:b] = torch.exp(z - row_max[:, None]).sum(dim=1)
        if n > 0:
            partial[b:] = torch.where(mine, z.gather(1, idx[:, None]).squeeze(1), torch.zeros_like(row_max))
        else:
            partial[b:] = 0
        total = pdist.all_reduce(partial, group=pg)
        lse = torch.log(total[:b]) + row_max
        losses = torch.where(valid, lse - total[b:], torch.zeros_like(lse))

        count = valid.sum()
        ctx.reduction = reduction
        ctx.out_dtype = logits.dtype
        ctx.pg = pg
        ctx.save_for_backward(logits, lse, row_max, idx, mine, valid, count)
        if reduction == "none":
            return losses.to(logits.dtype)
        s = losses.sum()
        if reduction == "mean":
            s = s / count  # 0/0 = nan when every target is ignored, as in F.cross_entropy
        return s.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        logits, lse, row_max, idx, mine, valid, count = ctx.saved_tensors
        z = logits.to(lse.dtype)
        if torch.is_grad_enabled():
            # create_graph: the saved lse is a constant to autograd, and a second derivative
            # would miss its dependence on every rank's logits (the -p p^T of the softmax
            # Hessian). Recompute it differentiably; its sum over ranks is Partial in the
            # gradient (each rank's consumer differs), hence copy_to_group(all_reduce(.)),
            # whose backward sums the ranks' gradients.
            local = torch.exp(z - row_max[:, None]).sum(dim=1)
            total = pdist.copy_to_group(pdist.all_reduce(local, group=ctx.pg), group=ctx.pg)
            lse = torch.log(total) + row_max
        p = torch.exp(z - lse[:, None])
        if z.shape[1] > 0:
            # Out of place: under create_graph, exp's backward needs p as it was.
            p = p.scatter_add(1, idx[:, None], -mine.to(p.dtype)[:, None])
        g = grad.to(lse.dtype)
        if ctx.reduction == "mean":
            g = g / count
        scale = torch.where(valid, g.expand_as(lse), torch.zeros_like(lse))
        return (p * scale[:, None]).to(ctx.out_dtype), None, None, None, None, None, None


def parallel_cross_entropy(logits_shard: torch.Tensor, target: torch.Tensor, group=None,
                           reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """Softmax cross-entropy over logits sharded by class across ``group``.

    Equal to ``F.cross_entropy(full_logits, target, reduction=..., ignore_index=...)`` (to
    float32 rounding), gradients included, where ``full_logits`` concatenates every rank's
    shard along the class dim; the logits are never gathered.

    Args:
        logits_shard: ``(B, n_r)`` float tensor: this rank's classes, ``n_r`` as
            ``torch.tensor_split(C, K)`` gives for rank r (a rank may hold 0 classes).
        target: ``(B,)`` int64 global class indices in ``[0, C)`` or ``ignore_index``, the
            same on every rank.
        group: None (world), a ProcessGroup or a 1-D DeviceMesh.
        reduction: ``"mean"`` (over non-ignored targets), ``"sum"`` or ``"none"``.
        ignore_index: targets with this value contribute neither loss nor gradient.

    Returns:
        A scalar (or ``(B,)`` for ``"none"``) in the logits' dtype, identical on every rank.
    """
    if not isinstance(logits_shard, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("logits_shard and target must be torch.Tensors, got "
                        f"{type(logits_shard).__name__} and {type(target).__name__}")
    if not logits_shard.is_floating_point():
        raise TypeError(f"logits_shard must be a floating-point tensor, got {logits_shard.dtype}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold int64 class indices, got {target.dtype}")
    if logits_shard.dim() != 2:
        raise ValueError(f"logits_shard must be 2-d (batch, classes of this rank), got shape "
                         f"{tuple(logits_shard.shape)}")
    if target.shape != logits_shard.shape[:1]:
        raise ValueError(f"target must have shape ({logits_shard.shape[0]},) to match logits_shard of shape "
                         f"{tuple(logits_shard.shape)}, got {tuple(target.shape)}")
    if target.device != logits_shard.device:
        raise ValueError(f"target is on {target.device} but logits_shard is on {logits_shard.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    pg = pdist.resolve_group(group)
    k, rank = dist.get_world_size(pg), dist.get_rank(pg)
    return _ParallelCrossEntropy.apply(logits_shard, target.long(), pg, k, rank, reduction, int(ignore_index))
