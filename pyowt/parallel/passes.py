"""OWT schemes (b) and (c): the model-parallel head runs in K passes over the global batch.

With K workers holding b_r trunk rows each (B = sum b_r):

* (b) in pass j worker j broadcasts its b_j rows to all; the head runs on them; the
  gradient for those rows is summed back at worker j (the broadcast's backward). The
  broadcast of pass j+1 is started before pass j computes, so it is in flight meanwhile.
* (c) in pass j every worker contributes chunk j of its own rows (its b_r rows split K
  ways), gathered to all (backward: reduce-scatter back to the owners); each pass sees
  rows from every worker. The gather of pass j+1 overlaps pass j's compute.

Each pass runs the head's forward and backward at once, so the head's activations for only
one pass are alive at a time. ``fc_update="accumulate"``: every pass's loss is normalized
by B and the head gradients add up over the passes: exactly one big batch.
``fc_update="per_pass"`` (cuda-convnet2's variable batch size): the head's own optimizer
steps after every pass on that pass's mean loss, so pass j+1 sees the weights pass j left;
the trunk's gradient is the sum of what every pass sent back, and the trunk steps once.

The gradients the passes produce for the trunk are handed to autograd through the loss
tensor :func:`run_head_passes` returns: its backward pushes them into the trunk (and, in
accumulate mode, adds the head's gradients to ``.grad``, so that an ``optimizer.zero_grad()``
between ``loss()`` and ``backward()`` cannot wipe them).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from .. import distributed as pdist
from ..nn.functional import parallel_cross_entropy
from .layers import shard_range
from .layout import Layout


class _TrunkLoss(torch.autograd.Function):
    """Value: the step's loss. Backward: the passes' trunk gradient (and stashed head grads)."""

    @staticmethod
    def forward(ctx, trunk_out, value, trunk_grad, head_grads):
        ctx.trunk_grad, ctx.head_grads = trunk_grad, head_grads
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        for p, gp in ctx.head_grads:
            p.grad = gp * g if p.grad is None else p.grad + gp * g
        return ctx.trunk_grad * g, None, None, None


def _pass_rows(scheme: str, k: int, b_total: int) -> List[List[Tuple[int, int, int]]]:
    """For each pass: the (owner rank, start, stop) row ranges it takes, in global rows."""
    passes = []
    shards = [shard_range(b_total, k, r) for r in range(k)]
    for j in range(k):
        if scheme == "b":
            passes.append([(j, *shards[j])])
        else:
            pieces = []
            for r, (s, e) in enumerate(shards):
                cs, ce = shard_range(e - s, k, j)
                pieces.append((r, s + cs, s + ce))
            passes.append(pieces)
    return passes


def _start_pass(pieces, scheme, local, my_start, rank, group):
    """Start moving one pass's rows; returns a handle whose wait() gives them."""
    if scheme == "b":
        owner, s, e = pieces[0]
        # Non-source ranks pass a placeholder that requires grad, so that every rank joins
        # the backward's reduce to the owner.
        src = local if owner == rank else local.new_empty((e - s,) + tuple(local.shape[1:])).requires_grad_(True)
        return pdist.broadcast_async(src, src=owner, group=group)
    own = next(p for p in pieces if p[0] == rank)
    mine = local[own[1] - my_start: own[2] - my_start]
    sizes = [e - s for _, s, e in pieces]
    return pdist.all_gather_async(mine, dim=0, group=group, grad="reduce_scatter", sizes=sizes)


def run_head_passes(pmodel, trunk_out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Run the head in K passes (scheme b or c); return the step's loss tensor.

    Args:
        trunk_out: this rank's trunk output, ``(b_r, ...)``, attached to the trunk's graph.
        labels: the global batch's labels, ``(B,)``.
    """
    plan, group, k, rank = pmodel.plan, pmodel.group, pmodel.k, pmodel.rank
    b_total = pmodel._batch.global_size
    per_pass = plan.fc_update == "per_pass"
    if per_pass and pmodel.head_optimizer is None:
        raise ValueError("fc_update='per_pass' needs parallelize(..., head_optimizer=...) to step the head after each pass")
    local = trunk_out.detach().requires_grad_(True)
    my_start = shard_range(b_total, k, rank)[0]
    head_params = [p for p in pmodel.head.parameters() if p.requires_grad]
    saved = [p.grad for p in head_params]  # gradients the caller may hold, restored below
    for p in head_params:
        p.grad = None
    # Scheme c with fewer than K rows on a worker leaves some passes empty: skip them.
    passes = [p for p in _pass_rows(plan.scheme, k, b_total) if sum(e - s for _, s, e in p) > 0]
    total = torch.zeros((), dtype=torch.float32, device=trunk_out.device)
    pending = _start_pass(passes[0], plan.scheme, local, my_start, rank, group)
    try:
        for j, pieces in enumerate(passes):
            rows_in = pending.wait()
            if j + 1 < len(passes):  # in flight while this pass computes
                pending = _start_pass(passes[j + 1], plan.scheme, local, my_start, rank, group)
            rows = torch.cat([torch.arange(s, e) for _, s, e in pieces])
            pmodel._batch.head_rows = rows
            out = rows_in
            for stage in pmodel.head:
                out = stage(out)
            y = labels[rows.to(labels.device)]
            norm = rows.numel() if per_pass else b_total
            if pmodel.output_layout == Layout.SHARD_CHANNEL:
                loss_j = parallel_cross_entropy(out, y, group=group, reduction="sum") / norm
            else:
                loss_j = F.cross_entropy(out, y, reduction="sum") / norm
            loss_j.backward()
            total += loss_j.detach().float()
            if per_pass:
                pmodel.head_optimizer.step()
                pmodel.head_optimizer.zero_grad(set_to_none=True)
    finally:
        pmodel._batch.head_rows = None
    if per_pass:
        head_grads = []
        for p, g in zip(head_params, saved):
            p.grad = g
    else:
        head_grads = [(p, p.grad) for p in head_params if p.grad is not None]
        for p, g in zip(head_params, saved):
            p.grad = g
    trunk_grad = local.grad if local.grad is not None else torch.zeros_like(local)
    return _TrunkLoss.apply(trunk_out, total.to(trunk_out.dtype), trunk_grad, head_grads)
