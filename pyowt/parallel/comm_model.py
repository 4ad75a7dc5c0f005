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


def _walk(ops, x, vol, k, rank, itemsize, replicated_bytes):
    """Add the forward and backward traffic of ``ops`` run on ``x`` (global rows); return
    the output (a meta tensor)."""
    for op in ops:
        if op.kind == LAYER:
            m = op.step.module
            x = F.conv2d(x, m.weight.to("meta"), None, m.stride, m.padding, m.dilation) if op.step.kind == CONV \
                else F.linear(x, m.weight.to("meta"))
            if op.config == SPLIT_IN:
                _add(vol, "all_reduce", all_reduce_bytes(x.numel(), k, rank, itemsize))
            if op.config == DATA:
                replicated_bytes += [p.numel() * itemsize for p in m.parameters() if p.requires_grad]
        elif op.kind == MODULE:
            x = (op.step.module if op.step.module is not None else nn.Flatten(1))(x)
        elif op.kind == DROP:
            pass
        elif op.kind == ALL_GATHER:
            sizes, row = _gather_bytes(x.shape, op.dim, k, rank, itemsize)
            _add(vol, "all_gather", all_gather_bytes(sizes, rank, row))
            if op.grad == "reduce_scatter":
                _add(vol, "reduce_scatter", reduce_scatter_bytes(sizes, rank, row))
        elif op.kind == SPLIT:
            sizes, row = _gather_bytes(x.shape, op.dim, k, rank, itemsize)
            _add(vol, "all_gather", all_gather_bytes(sizes, rank, row))
        elif op.kind == COPY_TO_GROUP:
            _add(vol, "all_reduce", all_reduce_bytes(x.numel(), k, rank, itemsize))
        else:  # pragma: no cover
            raise AssertionError(op.kind)
    return x


def _loss_volume(vol, output_layout, batch, k, rank, itemsize):
    if output_layout == Layout.SHARD_BATCH:
        _add(vol, "all_reduce", all_reduce_bytes(1, k, rank, itemsize))  # the loss value
    elif output_layout == Layout.SHARD_CHANNEL:
        for kind, numel in parallel_cross_entropy_comm(batch, k):
            _add(vol, kind, all_reduce_bytes(numel, k, rank, itemsize))


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
    program = compile_plan(plan, steps)
    vol: Volume = defaultdict(lambda: {"calls": 0, "sent": 0, "received": 0})
    batch = input_shape[0]
    replicated_bytes: List[int] = []
    ops = program.ops
    boundary = None
    if plan.scheme != "a":
        boundary = next(i for i, op in enumerate(ops) if op.kind == ALL_GATHER and op.gather_of == "batch")
    with torch.no_grad():
        x = torch.empty(tuple(input_shape), device="meta")
        x = _walk(ops[:boundary], x, vol, k, rank, itemsize, replicated_bytes)
        if boundary is None:
            _loss_volume(vol, program.output_layout, batch, k, rank, itemsize)
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
                _walk(ops[boundary + 1:], h, vol, k, rank, itemsize, replicated_bytes)
                _loss_volume(vol, program.output_layout, n, k, rank, itemsize)
    if k > 1 and replicated_bytes:
        for idx in bucket_indices(replicated_bytes, int(bucket_mb * 2**20)):
            _add(vol, "all_reduce", all_reduce_bytes(sum(replicated_bytes[i] for i in idx) // itemsize, k, rank, itemsize))
    return {kind: dict(v) for kind, v in vol.items()}


def total_sent(vol: Volume) -> int:
    return sum(v["sent"] for v in vol.values())
