"""The tasks of one training step of a plan, from the program pyowt would run.

For chains, :func:`chain_tasks` walks ``compile_plan(plan, steps).ops`` (the same program
:func:`pyowt.parallelize` instantiates and :mod:`pyowt.parallel.comm_model` counts), with the
global activation shapes from :func:`pyowt.planner.capture.capture`, and emits for device
``rank`` of ``k``: a compute task per layer (on its local shard), a communication task per
collective the program issues (forward, loss, backward: the duals of the transitions), one
all-reduce per gradient bucket of replicated parameters (grouped as
:func:`pyowt.parallel.grad_sync.bucket_indices` groups them, launched when the bucket's last
gradient is ready) and the optimizer step. Byte counts follow ``comm_model`` exactly.

OWT schemes b/c (``plan.scheme``): the batch all-gather into the head becomes K passes
(:func:`_head_passes`, as :mod:`pyowt.parallel.passes` runs them), bytes again equal to
``comm_model`` (broadcast/reduce for b, chunked all-gather/reduce-scatter for c).

Hybrid plans (``plan.split_degree`` s < K, :mod:`pyowt.parallel.mesh`): the device's split
group of s works on its batch block (the shapes' batch is the block's rows), transitions and
split-layer collectives run in that group, the split layers' gradients are all-reduced over
the replica group of K / s, data layers' over all K. A collective's cost knows which nodes
its group spans (split groups are consecutive ranks).

With ``granular=True`` every replicated layer gets its own gradient all-reduce and its own
optimizer task, so that the serialized step time (all durations summed) splits into
per-layer segments that depend only on two neighbouring configs: the chain DP's objective.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from torch import nn

from ..distributed.accounting import (all_gather_bytes, all_reduce_bytes, broadcast_bytes, reduce_bytes,
                                      reduce_scatter_bytes, split_sizes)
from ..nn.functional import parallel_cross_entropy_comm
from ..parallel.grad_sync import bucket_indices
from ..parallel.graph import CONV
from ..parallel.layout import DATA, INPUT_LAYOUT, OUTPUT_LAYOUT, SPLIT_IN, SPLIT_OUT, Layout
from ..parallel.mesh import block_range, check_split_degree
from ..parallel.passes import _pass_rows
from ..parallel.plan import Plan
from ..parallel.program import ALL_GATHER, COPY_TO_GROUP, DROP, LAYER, MODULE, SPLIT, compile_plan
from .capture import ModelGraph
from .costs import CostModel, OpSig
from .simulator import COMM, COMPUTE, Task

Shape = Tuple[int, ...]


@dataclass
class StepTasks:
    """The tasks of a step on one device and its peak memory estimate (bytes)."""

    tasks: List[Task]
    memory: float
    param_bytes: float
    activation_bytes: float


def local_shape(shape: Shape, layout: Layout, k: int, rank: int) -> Shape:
    """This rank's block of a global activation of ``shape`` under ``layout``."""
    s = list(shape)
    if layout == Layout.SHARD_BATCH:
        s[0] = split_sizes(shape[0], k)[rank]
    elif layout == Layout.SHARD_CHANNEL:
        s[1] = split_sizes(shape[1], k)[rank]
    return tuple(s)


class _Builder:
    """Tasks of one device. ``k``/``rank`` are the device's split group and its rank in it
    (the whole group unless ``split_degree`` < K); ``world_k``/``world_rank``, ``d``/``row``
    the whole group and the replica group."""

    def __init__(self, cost: CostModel, k: int, rank: int, granular: bool, split_degree: Optional[int] = None):
        self.world_k, self.world_rank = k, rank
        self.cost, self.granular = cost, granular
        self.at(check_split_degree(split_degree, k))
        self.isz = cost.itemsize
        self.tasks: List[Task] = []
        self.last: Optional[int] = None   # task producing the current activation (forward)
        self.bwd: List[tuple] = []        # backward entries, forward order
        self.segment = 0
        self.activations = 0.0

    def add(self, name, stream, duration, phase, kind="", sent_recv=(0, 0), deps=None) -> int:
        if deps is None:
            deps = () if self.last is None else (self.last,)
        self.tasks.append(Task(name, stream, duration, tuple(deps), phase, kind, sent_recv[0], sent_recv[1], self.segment))
        return len(self.tasks) - 1

    def compute(self, name, sig: OpSig, module=None):
        f, b = self.cost.compute(sig, module)
        self.last = self.add(f"fwd {name}", COMPUTE, f, "fwd")
        self.activations += math.prod(sig.out) * self.isz
        self.bwd.append((f"bwd {name}", COMPUTE, b, "", (0, 0), self.segment, None))

    def at(self, degree: Optional[int]) -> "_Builder":
        """Work in the split groups of ``degree`` (``None``: all K) from now on."""
        s = self.world_k if degree is None else degree
        self.k, self.d = s, self.world_k // s
        self.row, self.rank = divmod(self.world_rank, s)
        return self

    def block(self, shape: Shape) -> Shape:
        """A global activation shape cut to this split group's batch block."""
        start, stop = block_range(shape[0], self.world_k, self.k, self.row)
        return (stop - start,) + tuple(shape[1:])

    def group(self, which: str):
        """(size, this device's rank, nodes spanned) of the ``split``, ``replica`` or
        ``world`` group."""
        c = self.cost.cluster
        if which == "world":
            ranks, r = range(self.world_k), self.world_rank
        elif which == "split":
            ranks, r = range(self.row * self.k, (self.row + 1) * self.k), self.rank
        else:
            ranks, r = range(self.rank, self.world_k, self.k), self.row
        per = c.per_node if c.nodes > 1 and c.workers == self.world_k else None
        nodes = len({x // per for x in ranks}) if per else None
        return len(ranks), r, nodes

    def time(self, kind, nbytes, which="split") -> float:
        n, _, nodes = self.group(which)
        return self.cost.collective(kind, nbytes, n, nodes)

    def collective(self, name, kind, numel, sent_recv, phase="fwd", which="split"):
        t = self.time(kind, numel * self.isz, which)
        self.last = self.add(name, COMM, t, phase, kind, sent_recv)

    def bwd_collective(self, name, kind, numel, sent_recv):
        t = self.time(kind, numel * self.isz)
        self.bwd.append((name, COMM, t, kind, sent_recv, self.segment, None))

    def loss_value(self, layout: Layout) -> None:
        """The loss value's all-reduce: over all K for batch-sharded logits, else over the
        replica group (d > 1: each split group holds its block's part)."""
        which = "world" if layout == Layout.SHARD_BATCH else "replica"
        n, r, _ = self.group(which)
        if n > 1:
            self.collective("all_reduce loss", "all_reduce", 1, all_reduce_bytes(1, n, r, self.isz), "loss", which)

    def grad_sync(self, params, which: str, bucket_bytes: int, bucket_start: int = 0) -> list:
        """Gradient buckets of ``params`` ((bytes, layer index, segment), forward order) over
        the ``which`` group, as :class:`~pyowt.parallel.grad_sync.GradSync` groups them
        (one per layer when granular): per bucket the layers it waits for ("need"), its
        elements, segment, task name, group and (sent, received) bytes."""
        n, r, nodes = self.group(which)
        if n <= 1 or not params:
            return []
        nbytes = [p[0] for p in params]
        if self.granular:
            by_layer: dict = {}
            for i, p in enumerate(params):
                by_layer.setdefault(p[1], []).append(i)
            buckets = [by_layer[lay] for lay in sorted(by_layer, reverse=True)]
        else:
            buckets = bucket_indices(nbytes, bucket_bytes)
        out = []
        for bi, bk in enumerate(buckets):
            numel = sum(nbytes[i] for i in bk) // self.isz
            out.append({"need": set(params[i][1] for i in bk), "numel": numel, "segment": params[bk[0]][2],
                        "name": f"grad all_reduce{'' if which == 'world' else ' ' + which} bucket {bucket_start + bi}",
                        "bytes": all_reduce_bytes(numel, n, r, self.isz),
                        "time": self.cost.collective("all_reduce", numel * self.isz, n, nodes)})
        return out

    def launch_ready(self, buckets: list, done: dict) -> list:
        """Emit the all-reduce of every bucket (from :meth:`grad_sync`) whose layers' backward
        tasks are all in ``done`` (layer key -> task) and not launched yet; returns the new
        tasks."""
        launched = []
        for bk in buckets:
            if bk["need"] and bk["need"] <= done.keys():
                self.segment = bk["segment"]
                launched.append(self.add(bk["name"], COMM, bk["time"], "sync", "all_reduce", bk["bytes"],
                                         deps=tuple(done[x] for x in sorted(bk["need"]))))
                bk["need"] = set()
        return launched

    def bucket_peak(self, buckets: list) -> float:
        """Bytes of the largest gradient bucket (it is alive while it is reduced)."""
        return max((bk["numel"] * self.isz for bk in buckets), default=0)


def _gather_rows(shape: Shape, dim: int, k: int, isz: int):
    n = shape[dim]
    return split_sizes(n, k), isz * (math.prod(shape) // n if n else 0)


def _layer_sig(step, cfg, x_shape, out_global, k, rank, act, dgrad) -> Tuple[OpSig, Shape]:
    m = step.module
    cout = m.out_channels if step.kind == CONV else m.out_features
    out = list(out_global)
    if cfg == SPLIT_OUT:
        cout = split_sizes(cout, k)[rank]
        out[1 if step.kind == CONV else -1] = cout
    if cfg == DATA:
        out[0] = x_shape[0]
    has_bias = m.bias is not None and cfg != SPLIT_IN
    act = None if cfg == SPLIT_IN else act
    if step.kind == CONV:
        params = (cout, tuple(m.kernel_size), tuple(m.stride), tuple(m.padding), tuple(m.dilation), has_bias, act, dgrad)
        return OpSig("conv", tuple(x_shape), tuple(out), params), tuple(out)
    return OpSig("linear", tuple(x_shape), tuple(out), (cout, has_bias, act, dgrad)), tuple(out)


def _head_passes(b: _Builder, plan: Plan, batch: int, shape: Shape, head_ops, head_segs, seg, emit, loss, st,
                 local_params) -> list:
    """OWT schemes b/c (:mod:`pyowt.parallel.passes`): the head runs K passes, each moving its
    rows in (broadcast from the owner for b, all-gather of a chunk of every worker's rows for
    c; the next pass's transfer is issued before this pass computes, so it overlaps it), then
    the head's forward, loss and backward at once, and the rows' gradient back to their owners
    (reduce / reduce-scatter). Head parameters count once; only one pass's head activations
    are alive at a time. Returns the head's (numel, segment) entries when ``fc_update`` is
    ``per_pass`` (their optimizer step is emitted after every pass), else ``[]``."""
    k, rank, isz, cost = b.k, b.rank, b.isz, b.cost
    row = isz * math.prod(shape[1:])
    passes = [p for p in _pass_rows(plan.scheme, k, batch) if sum(e - s for _, s, e in p) > 0]
    trunk_last = b.last
    per_pass = plan.fc_update == "per_pass"

    def move(pieces, j, backward):
        n = sum(e - s for _, s, e in pieces)
        b.segment = seg
        if plan.scheme == "b":
            owner = pieces[0][0]
            kind = "reduce" if backward else "broadcast"
            sr = (reduce_bytes if backward else broadcast_bytes)(n * row, k, rank, owner)
        else:
            sizes = [e - s for _, s, e in pieces]
            kind = "reduce_scatter" if backward else "all_gather"
            sr = (reduce_scatter_bytes if backward else all_gather_bytes)(sizes, rank, row)
        t = cost.collective(kind, n * row, k)
        deps = None if backward else ((trunk_last,) if trunk_last is not None else ())
        return b.add(f"{kind} pass {j}", COMM, t, "bwd" if backward else "fwd", kind, sr, deps=deps)

    data_in_head = [op.step.name for op in head_ops if op.kind == LAYER and op.config == DATA]
    if data_in_head:  # their gradient all-reduce after the passes is not modelled
        raise ValueError(f"the planner models schemes b/c with a model-parallel head only; data layers after the "
                         f"batch gather: {data_in_head}")
    base_index, act0, act_peak = st["layer_index"], b.activations, 0.0
    n_before = len(local_params)
    head: list = []
    pending = move(passes[0], 0, False)
    for j, pieces in enumerate(passes):
        n = sum(e - s for _, s, e in pieces)
        b.last = pending
        if j + 1 < len(passes):  # in flight while this pass computes
            pending = move(passes[j + 1], j + 1, False)
        st["layer_index"] = base_index
        mark = len(b.bwd)
        b.activations = act0 + n * row
        sh, lay = (n,) + tuple(shape[1:]), Layout.REPLICATE
        for op, sg in zip(head_ops, head_segs):
            sh, lay = emit(op, sg, sh, lay, rows=n, count_params=(j == 0))
        loss(sh, lay, n)
        act_peak = max(act_peak, b.activations - act0)
        if j == 0:
            head = local_params[n_before:]
        for name, stream, dur, kind, sr, sg, _ in reversed(b.bwd[mark:]):  # this pass's backward now
            b.segment = sg
            b.last = b.add(name, stream, dur, "bwd", kind, sr)
        del b.bwd[mark:]
        b.last = move(pieces, j, True)
        if per_pass:
            for numel, sg in head:
                b.segment = sg
                f, _ = cost.compute(OpSig("optimizer", (numel,), ()))
                b.last = b.add("head optimizer", COMPUTE, f, "opt")
    b.activations = act0 + act_peak
    return head if per_pass else []


def chain_tasks(graph: ModelGraph, plan: Plan, cost: CostModel, k: int, rank: int = 0,
                bucket_bytes: int = 25 * 2**20, granular: bool = False, opt_states: int = 1) -> StepTasks:
    """Tasks of one training step of ``plan`` on device ``rank`` of ``k`` (see the module doc).

    ``opt_states``: optimizer buffers per parameter (1 for SGD with momentum, 2 for Adam).
    """
    if not graph.is_chain:
        raise ValueError("chain_tasks needs a chain model; use pyowt.planner.dag.dag_tasks for DAGs")
    program = compile_plan(plan, graph.steps, k)
    b = _Builder(cost, k, rank, granular)
    if plan.scheme != "a" and any(op.degree is not None for op in program.ops):
        raise ValueError(f"scheme {plan.scheme!r} needs every split layer at degree {k}")
    world_k, world_rank = k, rank
    isz = b.isz
    layout = program.input_layout
    # Activation shapes: the global batch's rows under Shard(batch), the current split
    # group's block otherwise (all rows at degree K).
    shape = graph.input_shape if layout == Layout.SHARD_BATCH else b.at(program.input_degree).block(graph.input_shape)

    def loc(shape, layout):
        """This device's block of an activation (``shape`` as above) under ``layout``."""
        if layout == Layout.SHARD_BATCH:
            return local_shape(shape, layout, world_k, world_rank)
        return local_shape(shape, layout, b.k, b.rank)

    b.activations += math.prod(loc(shape, layout)) * isz
    replicated: List[Tuple[int, int, int]] = []  # (bytes, layer index, segment) in forward order
    sharded: dict = {}  # degree -> the same for split layers' local shards
    local_params = []  # (numel, segment)
    # Segment of an op: the weight layer it leads into (the tail joins the last layer).
    n_layers = sum(op.kind == LAYER for op in program.ops)
    segs, nxt = [], 0
    for op in program.ops:
        segs.append(min(nxt, n_layers - 1))
        nxt += op.kind == LAYER
    st = {"layer_index": -1, "first": True}

    def emit(op, seg, shape, layout, rows=None, count_params=True):
        """Tasks of one op on an activation of ``shape`` (see above); ``rows``: a head pass's rows."""
        b.segment = seg
        total = graph.input_shape[0] if rows is None else rows
        if op.kind in (ALL_GATHER, SPLIT, COPY_TO_GROUP, DROP) or (op.kind == LAYER and op.config != DATA):
            b.at(op.degree)  # they run in the groups of their degree; other ops keep the layout's
        k, rank = b.k, b.rank

        def glob(name, out_layout):
            shp = (total,) + tuple(graph.shapes[name][1:])
            return shp if out_layout == Layout.SHARD_BATCH else b.block(shp)

        if op.kind == LAYER:
            s, cfg = op.step, op.config
            st["layer_index"] += 1
            layer_index = st["layer_index"]
            x = loc(shape, INPUT_LAYOUT[cfg])
            out_global = glob(s.name, OUTPUT_LAYOUT[cfg])
            sig, out_local = _layer_sig(s, cfg, x, out_global, k, rank, op.activation, not st["first"])
            st["first"] = False
            b.compute(s.name, sig)
            # this layer's backward entry carries its index so that gradient buckets can follow it
            name, stream, dur, kind, sr, seg, _ = b.bwd[-1]
            b.bwd[-1] = (name, stream, dur, kind, sr, seg, layer_index)
            params = [p for p in s.module.parameters() if p.requires_grad] if count_params else []
            if not count_params:
                pass
            elif cfg == DATA:
                replicated.extend((p.numel() * isz, layer_index, b.segment) for p in params)
                local_params.append((sum(p.numel() for p in params), b.segment))
            else:
                dim = 0 if cfg == SPLIT_OUT else 1
                w = s.module.weight
                n = math.prod(w.shape) // w.shape[dim] * split_sizes(w.shape[dim], k)[rank]
                mine = sharded.setdefault(op.degree, [])
                mine.append((n * isz, layer_index, b.segment))
                if s.module.bias is not None:
                    nb = split_sizes(w.shape[0], k)[rank] if cfg == SPLIT_OUT else w.shape[0]
                    mine.append((nb * isz, layer_index, b.segment))
                    n += nb
                local_params.append((n, b.segment))
            if cfg == SPLIT_IN:
                numel = math.prod(out_global)
                b.collective(f"all_reduce {s.name}", "all_reduce", numel, all_reduce_bytes(numel, k, rank, isz))
                dim = 1 if s.kind == CONV else len(out_global) - 1
                b.compute(f"{s.name} bias", OpSig("bias_act", tuple(out_global), tuple(out_global), (op.activation, dim)))
            layout = OUTPUT_LAYOUT[cfg]
            shape = out_global
        elif op.kind in (MODULE, DROP):
            s = op.step
            out_global = glob(s.name, layout)
            x, y = loc(shape, layout), loc(out_global, layout)
            if op.kind == DROP:
                sig = OpSig("dropout", x, y)
            else:
                sig = OpSig("module", x, y, (repr(s.module) if s.module is not None else "Flatten(1)",))
            b.compute(s.name, sig, s.module if s.module is not None else nn.Flatten(1))
            shape = out_global
        elif op.kind == ALL_GATHER:
            if op.dim == 0:  # Shard(batch) -> this split group's block
                shape = b.block(shape)
            sizes, row = _gather_rows(shape, op.dim, k, isz)
            numel = math.prod(shape)
            b.collective(f"all_gather dim{op.dim}", "all_gather", numel, all_gather_bytes(sizes, rank, row))
            b.activations += numel * isz
            if op.grad == "reduce_scatter":
                b.bwd_collective(f"reduce_scatter dim{op.dim}", "reduce_scatter", numel, reduce_scatter_bytes(sizes, rank, row))
            layout = Layout.REPLICATE
        elif op.kind == SPLIT:
            sizes, row = _gather_rows(shape, op.dim, k, isz)
            b.bwd_collective(f"all_gather dim{op.dim} (split grad)", "all_gather", math.prod(shape),
                             all_gather_bytes(sizes, rank, row))
            layout = Layout.SHARD_BATCH if op.dim == 0 else Layout.SHARD_CHANNEL
            if op.dim == 0:
                shape = (total,) + tuple(shape[1:])
        elif op.kind == COPY_TO_GROUP:
            numel = math.prod(shape)
            b.bwd_collective("all_reduce (copy_to_group grad)", "all_reduce", numel, all_reduce_bytes(numel, k, rank, isz))
        else:  # pragma: no cover
            raise AssertionError(op.kind)
        return shape, layout

    def loss(shape, layout, batch):
        """The loss: cross-entropy over this rank's logits, and the collectives it issues."""
        b.segment = n_layers - 1
        b.at(program.output_degree)
        logits = loc(shape, layout)
        b.compute("loss", OpSig("loss", logits, (logits[0],), (layout == Layout.SHARD_CHANNEL,)))
        if program.output_layout == Layout.SHARD_CHANNEL:
            for kind, numel in parallel_cross_entropy_comm(batch, b.k):
                b.collective("all_reduce loss", kind, numel, all_reduce_bytes(numel, b.k, b.rank, isz), "loss")
        b.loss_value(program.output_layout)

    ops = program.ops
    boundary = None  # schemes b/c: the batch all-gather into the head becomes K passes
    if plan.scheme != "a":
        boundary = next(i for i, op in enumerate(ops) if op.kind == ALL_GATHER and op.gather_of == "batch")
    for op, seg in zip(ops[:boundary], segs):
        shape, layout = emit(op, seg, shape, layout)
    head_params = []  # (numel, segment) of the head, stepped after every pass with per_pass
    if boundary is None:
        loss(shape, layout, shape[0])
    else:
        b.at(None)
        head_params = _head_passes(b, plan, graph.input_shape[0], shape, ops[boundary + 1:], segs[boundary + 1:],
                                   segs[boundary], emit, loss, st, local_params)
    # Backward in reverse, chained; gradient buckets launch when their last gradient is ready
    # (data layers' over all K, split layers' over the replica group when d > 1).
    pending = b.grad_sync(replicated, "world", bucket_bytes)
    for degree in sorted(sharded, key=lambda d: d or world_k):
        pending += b.at(degree).grad_sync(sharded[degree], "replica", bucket_bytes, len(pending))
    done_layers = {}
    sync_tasks = []
    for name, stream, dur, kind, sr, seg, layer in reversed(b.bwd):
        b.segment = seg
        idx = b.add(name, stream, dur, "bwd", kind, sr)
        b.last = idx
        if layer is None:
            continue
        done_layers[layer] = idx
        sync_tasks += b.launch_ready(pending, done_layers)
    deps = tuple(sync_tasks) + ((b.last,) if b.last is not None else ())
    if head_params:  # per_pass: the head stepped after each pass; the trunk steps here
        local_params = local_params[:len(local_params) - len(head_params)]  # the head's come last
    groups = local_params if granular else [(sum(n for n, _ in local_params), len(local_params) - 1)]
    for n, seg in groups:
        b.segment = seg
        f, _ = b.cost.compute(OpSig("optimizer", (n,), ()))
        b.add("optimizer", COMPUTE, f, "opt", deps=deps)
    nparams = sum(n for n, _ in local_params) + sum(n for n, _ in head_params)
    param_bytes = nparams * isz * (2 + opt_states)
    memory = param_bytes + b.activations + b.bucket_peak(pending)
    return StepTasks(b.tasks, memory, param_bytes, b.activations)


__all__ = ["StepTasks", "chain_tasks", "local_shape"]
