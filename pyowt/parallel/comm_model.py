"""Exact communication volume of one training step of a plan, without running it.

Walks the compiled program (:mod:`pyowt.parallel.program`) with the activation shapes of the
global batch and adds up, per collective kind, the bytes that rank ``rank`` of ``k`` sends and
receives in the forward, the backward, the loss and the gradient synchronization, with the
conventions of :mod:`pyowt.distributed.accounting` (nccl-tests' logical payload). A measured
step must match it to the byte; the planner uses it to cost plans for any K.

Closed forms for the presets (even splits, fp32, per worker per step, P parameters, A trunk
features, B = K*b):

* data: ``2(K-1)/K * 4 * P`` for the gradient all-reduce (plus 8(K-1)/K bytes for the loss value);
* owt(a), head column -> row -> column with the class-parallel loss:
  ``2(K-1)/K * 4 * P_conv`` + all-gather and reduce-scatter of the trunk output,
  ``(K-1) * b * A * 4`` each + one all-reduce of B x hidden in the forward and one in the
  backward, ``2 * 2(K-1)/K * 4 * B * hidden`` + the loss's all-reduces of B floats;
* model: every split_in layer all-reduces its full output (B x C x H x W for a conv).

Hybrids (a plan's ``split_degree`` s < K, :mod:`pyowt.parallel.mesh`): every transition and
split-layer collective runs inside the rank's split group of s on its batch block, the
split layers' gradients are all-reduced over the replica group of K / s, and the loss value
over it too.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.accounting import (all_gather_bytes, all_reduce_bytes, broadcast_bytes, reduce_bytes,
                                      reduce_scatter_bytes, split_sizes)
from ..nn.functional import parallel_cross_entropy_comm
from .graph import CONV, capture_chain
from .grad_sync import bucket_indices
from .layout import DATA, SPLIT_IN, Layout
from .mesh import block_range
from .plan import resolve_plan
from .passes import _pass_rows
from .program import ALL_GATHER, COPY_TO_GROUP, DROP, LAYER, MODULE, SPLIT, compile_plan

Volume = Dict[str, Dict[str, int]]  # kind -> {"calls", "sent", "received"}


def _add(vol, kind: str, sent_received: Tuple[int, int]) -> None:
    v = vol[kind]
    v["calls"] += 1
    v["sent"] += sent_received[0]
    v["received"] += sent_received[1]


def _gather_bytes(shape, dim, k, rank, itemsize):
    n = shape[dim]
    row = itemsize * (torch.Size(shape).numel() // n if n else 0)
    return split_sizes(n, k), row


def _walk(ops, x, vol, k, rank, itemsize, replicated_bytes, shard_bytes=None, batch=None):
    """Add the forward and backward traffic of ``ops`` run on ``x`` by rank ``rank`` of
    ``k``; return the output (a meta tensor). ``x``'s batch dim holds the global ``batch``
    rows under ``Shard(batch)`` and the rows of the current split group's block otherwise
    (all rows for degree K). Each op's collectives run in the split group of its degree.
    Gradient bytes of data layers go to ``replicated_bytes``, of split layers (local shard
    sizes) to ``shard_bytes[degree]``."""
    for op in ops:
        s = op.degree or k
        row, col = divmod(rank, s)
        if op.kind == LAYER:
            m = op.step.module
            x = F.conv2d(x, m.weight.to("meta"), None, m.stride, m.padding, m.dilation) if op.step.kind == CONV \
                else F.linear(x, m.weight.to("meta"))
            if op.config == SPLIT_IN:
                _add(vol, "all_reduce", all_reduce_bytes(x.numel(), s, col, itemsize))
            if op.config == DATA:
                replicated_bytes += [p.numel() * itemsize for p in m.parameters() if p.requires_grad]
            elif shard_bytes is not None:
                shard_bytes.setdefault(s, []).extend(_shard_numel(op.config, name, p, s, col) * itemsize
                                                     for name, p in m.named_parameters() if p.requires_grad)
        elif op.kind == MODULE:
            x = (op.step.module if op.step.module is not None else nn.Flatten(1))(x)
        elif op.kind == DROP:
            pass
        elif op.kind == ALL_GATHER:
            if op.dim == 0:  # Shard(batch) -> this split group's block
                start, stop = block_range(batch, k, s, row)
                x = x.new_empty((stop - start,) + tuple(x.shape[1:]))
            sizes, row_bytes = _gather_bytes(x.shape, op.dim, s, col, itemsize)
            _add(vol, "all_gather", all_gather_bytes(sizes, col, row_bytes))
            if op.grad == "reduce_scatter":
                _add(vol, "reduce_scatter", reduce_scatter_bytes(sizes, col, row_bytes))
        elif op.kind == SPLIT:
            sizes, row_bytes = _gather_bytes(x.shape, op.dim, s, col, itemsize)
            _add(vol, "all_gather", all_gather_bytes(sizes, col, row_bytes))
            if op.dim == 0:  # back to Shard(batch): global rows again
                x = x.new_empty((batch,) + tuple(x.shape[1:]))
        elif op.kind == COPY_TO_GROUP:
            _add(vol, "all_reduce", all_reduce_bytes(x.numel(), s, col, itemsize))
        else:  # pragma: no cover
            raise AssertionError(op.kind)
    return x


def _shard_numel(config: str, name: str, p, k: int, rank: int) -> int:
    """Elements of this rank's shard of a split layer's parameter ``name`` (weight/bias)."""
    if name == "bias" and config == SPLIT_IN:
        return p.numel()
    dim = 0 if (name == "bias" or config != SPLIT_IN) else 1
    return p.numel() // p.shape[dim] * split_sizes(p.shape[dim], k)[rank]


def _loss_volume(vol, output_layout, batch, s, col, itemsize, d=1, row=0):
    """The loss's collectives: the value over all K = d * s for a batch-sharded output;
    the class-parallel reductions in the split group, then the value over the replica
    group (d > 1), for split logits; the value over the replica group for replicated ones."""
    if output_layout == Layout.SHARD_BATCH:
        if d * s > 1:  # the loss value
            _add(vol, "all_reduce", all_reduce_bytes(1, d * s, row * s + col, itemsize))
        return
    if output_layout == Layout.SHARD_CHANNEL:
        for kind, numel in parallel_cross_entropy_comm(batch, s):
            _add(vol, kind, all_reduce_bytes(numel, s, col, itemsize))
    if d > 1:
        _add(vol, "all_reduce", all_reduce_bytes(1, d, row, itemsize))


def step_volume(model: nn.Module, plan, k: int, rank: int, input_shape: Sequence[int],
                itemsize: int = 4, bucket_mb: float = 25.0, **plan_options) -> Volume:
    """Per-kind calls and bytes (sent, received) of rank ``rank`` for one training step.

    Args:
        model: the single-process model.
        plan: a Plan or preset name (as for :func:`pyowt.parallelize`).
        k, rank: group size and this rank.
        input_shape: the *global* batch's input shape (B, C, H, W).
        itemsize: bytes per element of activations and gradients (4 for fp32).
        bucket_mb: the gradient bucket size parallelize was given.
    """
    steps = capture_chain(model)
    plan = resolve_plan(model, plan, **plan_options)
    program = compile_plan(plan, steps, k)
    vol: Volume = defaultdict(lambda: {"calls": 0, "sent": 0, "received": 0})
    batch = input_shape[0]
    replicated_bytes: List[int] = []
    shard_bytes: Dict[int, List[int]] = {}
    ops = program.ops
    boundary = None
    if plan.scheme != "a":
        if any(op.degree is not None for op in ops):
            raise ValueError(f"scheme {plan.scheme!r} needs every split layer at degree {k}")
        boundary = next(i for i, op in enumerate(ops) if op.kind == ALL_GATHER and op.gather_of == "batch")
    with torch.no_grad():
        rows = batch
        if program.input_layout != Layout.SHARD_BATCH:
            s_in = program.input_degree or k
            start, stop = block_range(batch, k, s_in, rank // s_in)
            rows = stop - start
        x = torch.empty((rows,) + tuple(input_shape[1:]), device="meta")
        x = _walk(ops[:boundary], x, vol, k, rank, itemsize, replicated_bytes, shard_bytes, batch)
        if boundary is None:
            s_out = program.output_degree or k
            _loss_volume(vol, program.output_layout, x.shape[0], s_out, rank % s_out, itemsize, k // s_out,
                         rank // s_out)
        else:
            for pieces in _pass_rows(plan.scheme, k, batch):
                n = sum(e - s for _, s, e in pieces)
                if n == 0:
                    continue
                row = itemsize * (x[0].numel())
                if plan.scheme == "b":
                    owner = pieces[0][0]
                    nbytes = n * row
                    _add(vol, "broadcast", broadcast_bytes(nbytes, k, rank, owner))
                    _add(vol, "reduce", reduce_bytes(nbytes, k, rank, owner))
                else:
                    sizes = [e - s for _, s, e in pieces]
                    _add(vol, "all_gather", all_gather_bytes(sizes, rank, row))
                    _add(vol, "reduce_scatter", reduce_scatter_bytes(sizes, rank, row))
                h = torch.empty((n,) + tuple(x.shape[1:]), device="meta")
                _walk(ops[boundary + 1:], h, vol, k, rank, itemsize, replicated_bytes, batch=n)
                _loss_volume(vol, program.output_layout, n, k, rank, itemsize)
    groups = [(replicated_bytes, k, rank)] + [(shard_bytes[s], k // s, rank // s) for s in sorted(shard_bytes)]
    for grads, n, r in groups:
        if n > 1 and grads:
            for idx in bucket_indices(grads, int(bucket_mb * 2**20)):
                _add(vol, "all_reduce", all_reduce_bytes(sum(grads[i] for i in idx) // itemsize, n, r, itemsize))
    return {kind: dict(v) for kind, v in vol.items()}


def total_sent(vol: Volume) -> int:
    return sum(v["sent"] for v in vol.values())
