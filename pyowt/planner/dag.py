"""Tasks of a training step for a general DAG (ResNet), for predictions only.

pyowt's runtime executes chains; for graphs with residual joins the planner applies the
same layout rules itself (prediction only, never executed):

* a weight layer under a config needs that config's input layout (as in the chain);
* pointwise layers, BatchNorm and dropout keep their input's layout (BatchNorm on
  ``Shard(batch)`` is costed as per-device statistics, like DDP without SyncBatchNorm);
* flatten and cross-channel layers need all channels;
* an add converts every input to the layout of its first input;
* every consumer of a tensor gets its own transition (no sharing between consumers).

Each edge whose layouts differ gets the chain's transitions (all-gather with a
reduce-scatter backward into a ``split_out`` consumer, else a split backward; split with an
all-gather backward), and a Replicate tensor that came out of a ``split_in`` sum feeding a
``split_out`` layer gets ``copy_to_group``'s backward all-reduce. The backward runs the
forward's tasks in reverse order, one after the other, as autograd does on one device.

Every tensor's layout is decided by one weight node, its *source*: a weight node's own
output; the source of a non-weight node's first input otherwise (the model's input belongs
to the first weight node, whose config decides whether it is batch-sharded). So each task's
duration depends on the configs of at most two weight nodes: a weight node's input
transition on (source of its input, the node), an add's conversion on (source of the
converted input, source of the first input), everything else on one node. With
``granular=True`` (one gradient all-reduce and one optimizer task per layer with
parameters, as the chain's granular mode) each task's ``segment`` is :func:`pair_key` of
those nodes, and the serialized step time is a sum of node and edge terms over
:func:`dag_edges`: the objective node/edge elimination minimizes exactly
(:mod:`pyowt.planner.elimination`).

``split_degree`` s < K (hybrids, :mod:`pyowt.parallel.mesh`) works as in
:func:`pyowt.planner.tasks.chain_tasks`: shapes cut to the split group's batch block,
transitions inside the split group, split layers' (and BatchNorm's outside batch sharding)
gradients summed over the replica group.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

from ..distributed.accounting import all_gather_bytes, all_reduce_bytes, reduce_scatter_bytes
from ..nn.functional import parallel_cross_entropy_comm
from ..parallel.graph import CROSS_CHANNEL, DROPOUT, FLATTEN
from ..parallel.layout import DATA, INPUT_LAYOUT, OUTPUT_LAYOUT, SPLIT_IN, SPLIT_OUT, Layout
from .capture import ADD, BATCHNORM, ModelGraph
from .costs import CostModel, OpSig
from .simulator import COMM, COMPUTE
from .tasks import StepTasks, _Builder, _gather_rows, _layer_sig, local_shape


def _transition(b: _Builder, shape, have: Layout, want: Layout, split_out_consumer: bool, partial_ok: bool,
                deps: Tuple[int, ...], name: str) -> int:
    """Tasks that move a tensor from ``have`` to ``want``; returns the task the consumer waits for."""
    k, rank, isz = b.k, b.rank, b.isz
    last = deps[0] if deps else None
    numel = math.prod(shape)
    if have == want:
        if want == Layout.REPLICATE and split_out_consumer and not partial_ok:
            b.bwd_collective(f"all_reduce (copy_to_group grad) {name}", "all_reduce", numel,
                             all_reduce_bytes(numel, k, rank, isz))
        return last
    if have in (Layout.SHARD_CHANNEL, Layout.SHARD_BATCH):
        dim = 1 if have == Layout.SHARD_CHANNEL else 0
        sizes, row = _gather_rows(shape, dim, k, isz)
        t = b.time("all_gather", numel * isz)
        last = b.add(f"all_gather dim{dim} {name}", COMM, t, "fwd", "all_gather", all_gather_bytes(sizes, rank, row),
                     deps=deps)
        b.activations += numel * isz
        if want == Layout.REPLICATE and split_out_consumer:
            b.bwd_collective(f"reduce_scatter dim{dim} {name}", "reduce_scatter", numel,
                             reduce_scatter_bytes(sizes, rank, row))
    if want != Layout.REPLICATE:
        dim = 0 if want == Layout.SHARD_BATCH else 1
        sizes, row = _gather_rows(shape, dim, k, isz)
        b.bwd_collective(f"all_gather dim{dim} (split grad) {name}", "all_gather", numel,
                         all_gather_bytes(sizes, rank, row))
    return last


def pair_key(i: int, j: int, n: int) -> int:
    """The ``segment`` code of a task depending on weight nodes ``i`` and ``j`` (of ``n``)."""
    return min(i, j) * n + max(i, j)


def _sources(graph: ModelGraph) -> List[Tuple[List[int], int]]:
    """Per node in order: the sources of its inputs and of its output (indices among weight
    nodes of the weight node deciding the layout). Resolved in execution order, as
    :func:`dag_tasks` resolves inputs, because a module applied twice (a shared ReLU) gives
    two nodes of the same name."""
    windex = {id(n): i for i, n in enumerate(graph.weight_nodes)}
    src: Dict[str, int] = {}
    out = []
    for node in graph.nodes:
        ins = [src[i] for i in node.inputs] or [0]
        me = windex[id(node)] if node.has_weights else ins[0]
        src[node.name] = me
        out.append((ins, me))
    return out


def dag_edges(graph: ModelGraph) -> List[Tuple[int, int]]:
    """Distinct weight-node pairs whose configs jointly decide some task (see the module doc)."""
    edges = []
    for node, (ins, me) in zip(graph.nodes, _sources(graph)):
        if node.has_weights:
            pairs = [(ins[0], me)]
        elif node.kind == ADD:
            pairs = [(s, ins[0]) for s in ins[1:]]
        else:
            pairs = []
        for u, v in pairs:
            e = (min(u, v), max(u, v))
            if u != v and e not in edges:
                edges.append(e)
    return edges


def dag_tasks(graph: ModelGraph, configs, cost: CostModel, k: int, rank: int = 0,
              bucket_bytes: int = 25 * 2**20, opt_states: int = 1, granular: bool = False,
              split_degree: Optional[int] = None) -> StepTasks:
    """Tasks of one step of ``graph`` with ``configs`` (one per weight node, in order).

    ``granular``: one gradient all-reduce and one optimizer task per layer, every task's
    ``segment`` the :func:`pair_key` of the weight nodes it depends on (see the module doc).
    ``split_degree``: the split layers' group size (default: all K).
    """
    cfg_of = {n.name: c for n, c in zip(graph.weight_nodes, configs)}
    nw = len(graph.weight_nodes)
    sources = _sources(graph)
    src: Dict[str, int] = {}
    rep_seg: Dict[str, int] = {}  # segment of each layer whose gradients are all-reduced
    b = _Builder(cost, k, rank, granular, split_degree)
    k, rank = b.k, b.rank  # the split group from here on
    isz = b.isz
    first_cfg = configs[0]
    in_layout = Layout.SHARD_BATCH if INPUT_LAYOUT[first_cfg] == Layout.SHARD_BATCH else Layout.REPLICATE
    out: Dict[str, Tuple[Layout, bool, int]] = {}  # node -> (layout, partial_ok, producing task)
    b.activations += math.prod(local_shape(b.block(graph.input_shape), in_layout, k, rank)) * isz
    replicated: List[Tuple[int, str]] = []
    sharded: List[Tuple[int, str]] = []  # gradients summed over the replica group (d > 1)
    local_params: List[Tuple[int, int]] = []  # (numel, segment) per layer with parameters
    nparams = 0
    first_weight = True
    for node, (in_src, me) in zip(graph.nodes, sources):
        src[node.name] = me
        srcs = [(out[i] if i in out else (in_layout, True, None)) for i in node.inputs] or [(in_layout, True, None)]
        in_shapes = [b.block(graph.shapes[i]) for i in node.inputs] or [b.block(graph.input_shape)]
        node_shape = b.block(node.shape)
        b.segment = pair_key(in_src[0], me, nw)
        if node.has_weights:
            cfg = cfg_of[node.name]
            want = INPUT_LAYOUT[cfg]
            have, pok, t = srcs[0]
            dep = _transition(b, in_shapes[0], have, want, cfg == SPLIT_OUT, pok, (t,) if t is not None else (), node.name)
            b.last = dep
            b.segment = pair_key(me, me, nw)
            x = local_shape(in_shapes[0], want, k, rank)
            act = None
            sig, _ = _layer_sig(node, cfg, x, node_shape, k, rank, act, not first_weight)
            first_weight = False
            b.compute(node.name, sig)
            params = [p for p in node.module.parameters() if p.requires_grad]
            if cfg == DATA:
                replicated += [(p.numel() * isz, node.name) for p in params]
                rep_seg[node.name] = b.segment
                local_params.append((sum(p.numel() for p in params), b.segment))
            else:
                local_params.append((sum(p.numel() for p in params) // k, b.segment))
                sharded += [(p.numel() // k * isz, node.name) for p in params]
                rep_seg[node.name] = b.segment
            nparams += local_params[-1][0]
            if cfg == SPLIT_IN:
                numel = math.prod(node_shape)
                b.collective(f"all_reduce {node.name}", "all_reduce", numel, all_reduce_bytes(numel, k, rank, isz))
            out[node.name] = (OUTPUT_LAYOUT[cfg], cfg != SPLIT_IN, b.last)
            continue
        if node.kind == ADD:
            layout, pok, t0 = srcs[0]
            deps = [t0] if t0 is not None else []
            for (have, p, t), shp, s in zip(srcs[1:], in_shapes[1:], in_src[1:]):
                b.segment = pair_key(s, in_src[0], nw)
                d = _transition(b, shp, have, layout, False, p, (t,) if t is not None else (), node.name)
                if d is not None:
                    deps.append(d)
            b.last = None
            b.segment = pair_key(me, me, nw)
            f, bw = cost.compute(OpSig("add", local_shape(node_shape, layout, k, rank), local_shape(node_shape, layout, k, rank)))
            b.last = b.add(f"fwd {node.name}", COMPUTE, f, "fwd", deps=tuple(deps))
            b.bwd.append((f"bwd {node.name}", COMPUTE, bw, "", (0, 0), b.segment, None))
            out[node.name] = (layout, pok, b.last)
            continue
        have, pok, t = srcs[0]
        layout = have
        b.last = t
        b.segment = pair_key(me, me, nw)
        if node.kind in (FLATTEN, CROSS_CHANNEL) and have == Layout.SHARD_CHANNEL:
            b.last = _transition(b, in_shapes[0], have, Layout.REPLICATE, False, pok, (t,) if t is not None else (), node.name)
            layout = Layout.REPLICATE
        x, y = local_shape(in_shapes[0], layout, k, rank), local_shape(node_shape, layout, k, rank)
        if node.kind == DROPOUT:
            sig = OpSig("dropout", x, y)
        elif node.kind == BATCHNORM:
            sig = OpSig("module", x, y, (repr(node.module),))
            params = [p for p in node.module.parameters() if p.requires_grad]
            if layout == Layout.SHARD_BATCH:
                replicated += [(p.numel() * isz, node.name) for p in params]
            else:  # the same statistics' parameters in every split group: summed over the replicas
                sharded += [(p.numel() // (k if layout == Layout.SHARD_CHANNEL else 1) * isz, node.name) for p in params]
            rep_seg[node.name] = b.segment
            local_params.append((sum(p.numel() for p in params) // (k if layout == Layout.SHARD_CHANNEL else 1), b.segment))
            nparams += local_params[-1][0]
        else:
            sig = OpSig("module", x, y, (repr(node.module) if node.module is not None else "Flatten(1)",))
        b.compute(node.name, sig, node.module)
        out[node.name] = (layout, pok, b.last)
    last = graph.nodes[-1]
    layout = out[last.name][0]
    b.segment = pair_key(sources[-1][1], sources[-1][1], nw)
    logits = local_shape(b.block(last.shape), layout, k, rank)
    b.compute("loss", OpSig("loss", logits, (logits[0],), (layout == Layout.SHARD_CHANNEL,)))
    if layout == Layout.SHARD_CHANNEL:
        for kind, numel in parallel_cross_entropy_comm(b.block(graph.input_shape)[0], k):
            b.collective("all_reduce loss", kind, numel, all_reduce_bytes(numel, k, rank, isz), "loss")
    b.loss_value(layout)
    # Backward: reverse order, chained; gradient buckets as in tasks.chain_tasks.
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    pending = b.grad_sync([(nb, order[name], rep_seg[name]) for nb, name in replicated], "world", bucket_bytes)
    pending += b.grad_sync([(nb, order[name], rep_seg[name]) for nb, name in sharded], "replica", bucket_bytes,
                           len(pending))
    owner_bwd = {}
    names_in_order = [e[0][4:] for e in b.bwd]
    sync = []
    for (name, stream, dur, kind, sr, seg, _), lname in zip(reversed(b.bwd), reversed(names_in_order)):
        b.segment = seg
        b.last = b.add(name, stream, dur, "bwd", kind, sr)
        if stream == COMPUTE and lname in order:
            owner_bwd[order[lname]] = b.last
        sync += b.launch_ready(pending, owner_bwd)
    deps = tuple(sync) + ((b.last,) if b.last is not None else ())
    for n, seg in (local_params if granular else [(nparams, -1)]):
        b.segment = seg
        f, _ = cost.compute(OpSig("optimizer", (n,), ()))
        b.add("optimizer", COMPUTE, f, "opt", deps=deps)
    param_bytes = nparams * isz * (2 + opt_states)
    return StepTasks(b.tasks, param_bytes + b.activations + b.bucket_peak(pending), param_bytes, b.activations)


__all__ = ["dag_edges", "dag_tasks", "pair_key"]
