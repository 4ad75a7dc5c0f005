"""The planner's front door: evaluate plans, search for the best one, ``auto_plan`` for parallelize.

:class:`Evaluator` turns a config per weight layer into the simulated step (time, peak
memory, timeline), memoizing op costs and re-simulating incrementally. :func:`search` runs
the chain DP (for chains), then MCMC seeded with data, OWT and the DP's plan under a memory
limit, once per split degree s (every divisor of K from 2 up: the split layers' group size,
data-parallel across K / s groups; :mod:`pyowt.parallel.mesh`), and returns the best plan
found with the presets' predictions beside it. For DAGs
(ResNet) node/edge elimination takes the DP's place (:mod:`pyowt.planner.elimination`, same
serialized objective, exact on series-parallel graphs). The auto
plan is the best of everything evaluated, so its predicted time is never above the presets'.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from ..parallel.graph import CONV, LINEAR
from ..parallel.layout import DATA, SPLIT_IN, SPLIT_OUT, format_config, parse_config
from ..parallel.mesh import check_split_degree
from ..parallel.plan import Plan
from .capture import ModelGraph, capture
from .costs import CostModel
from .search import Configs, candidates, dp_chain, mcmc, plan_from
from .simulator import Simulator, simulate
from .specs import ClusterSpec

PRESET_NAMES = ("data", "model", "owt")


@dataclass
class Prediction:
    """A plan's simulated step on the worst-loaded device (rank 0 holds the largest shards)."""

    name: str
    configs: Configs
    time: float
    memory: float
    comm_bytes: int  # bytes rank 0 sends per step
    feasible: bool = True
    compute: float = 0.0
    comm: float = 0.0
    split_degree: Optional[int] = None  # None: the split layers span all K

    def as_dict(self) -> dict:
        return {"strategy": self.name, "step_time_s": self.time, "memory_bytes": self.memory,
                "comm_bytes": self.comm_bytes, "feasible": self.feasible, "compute_s": self.compute,
                "comm_s": self.comm, "configs": list(self.configs), "split_degree": self.split_degree}


def preset_configs(graph: ModelGraph, preset: str) -> Configs:
    """Configs of the presets (as :func:`pyowt.parallel.make_plan` builds them) for any graph."""
    if preset not in PRESET_NAMES:
        raise ValueError(f"preset must be one of {PRESET_NAMES}, got {preset!r}")
    out, counts = [], {CONV: 0, LINEAR: 0}
    for n in graph.weight_nodes:
        alt = SPLIT_OUT if counts[n.kind] % 2 == 0 else SPLIT_IN
        counts[n.kind] += 1
        if preset == "data" or (preset == "owt" and n.kind == CONV):
            out.append(DATA)
        else:
            out.append(alt)
    return tuple(out)


class Evaluator:
    """Costs and simulates configs of one graph on ``k`` workers.

    Args:
        graph: from :func:`capture`.
        cost: the :class:`CostModel`.
        k: workers.
        bucket_mb: gradient bucket size (as parallelize's ``bucket_mb``).
        overlap: communication on its own stream (default: the cluster's setting).
        memory_limit: bytes per device; plans above it are infeasible.
        split_degree: the split layers' group size s (a divisor of k; ``None``: k).
        per_layer: (chains) every layer may pick its own split degree among the divisors
            of k (configs like ``"split_out@2"``); ``split_degree`` is then ignored.
    """

    def __init__(self, graph: ModelGraph, cost: CostModel, k: int, bucket_mb: float = 25.0,
                 overlap: Optional[bool] = None, memory_limit: Optional[float] = None,
                 split_degree: Optional[int] = None, per_layer: bool = False):
        self.graph, self.cost, self.k = graph, cost, k
        if per_layer and not graph.is_chain:
            raise ValueError("per-layer split degrees are modelled for chain models only")
        self.s = check_split_degree(None if per_layer else split_degree, k)
        self.split_degree = None if self.s == k else self.s  # as plans write it
        self.bucket_mb = bucket_mb
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.overlap = cost.cluster.overlap if overlap is None else overlap
        self.memory_limit = memory_limit
        self.sim = Simulator(self.overlap)
        self.per_layer = per_layer
        self.cands = candidates(graph, self.s, split_degrees(k) if per_layer else None)
        self.evaluations = 0
        # Evaluators of the same graph and costs, shared: one per split degree, and the
        # per-layer one under the key "per_layer".
        self._others: Dict[object, "Evaluator"] = {"per_layer" if per_layer else self.s: self}

    def for_split(self, split_degree: Optional[int]) -> "Evaluator":
        """The evaluator of the same graph and costs for another split degree (cached)."""
        s = check_split_degree(split_degree, self.k)
        if s not in self._others:
            ev = Evaluator(self.graph, self.cost, self.k, self.bucket_mb, self.overlap, self.memory_limit, s)
            ev._others = self._others
            self._others[s] = ev
        return self._others[s]

    def for_per_layer(self) -> "Evaluator":
        """The evaluator in which every layer picks its own degree (cached; chains)."""
        if "per_layer" not in self._others:
            ev = Evaluator(self.graph, self.cost, self.k, self.bucket_mb, self.overlap, self.memory_limit,
                           per_layer=True)
            ev._others = self._others
            self._others["per_layer"] = ev
        return self._others["per_layer"]

    def degree_config(self, config: str, default: Optional[int] = None) -> str:
        """``config`` as the per-layer candidates write it: its own degree, else
        ``default``; degree K written plainly."""
        base, degree = parse_config(config)
        if base == DATA:
            return base
        degree = default if degree is None else degree
        return format_config(base, None if degree in (None, self.k) else degree)

    def valid(self, configs: Configs) -> bool:
        return all(c in cs for c, cs in zip(configs, self.cands))

    def tasks(self, configs: Configs, rank: int = 0, granular: bool = False):
        if self.graph.is_chain:
            from .tasks import chain_tasks

            return chain_tasks(self.graph, plan_from(self.graph, configs, split_degree=self.split_degree), self.cost,
                               self.k, rank, self.bucket_bytes, granular)
        from .dag import dag_tasks

        return dag_tasks(self.graph, configs, self.cost, self.k, rank, self.bucket_bytes, granular=granular,
                         split_degree=self.split_degree)

    def predict(self, configs: Configs, name: str = "auto") -> Prediction:
        if not self.valid(configs):
            return Prediction(name, configs, math.inf, math.inf, 0, feasible=False, split_degree=self.split_degree)
        return self._simulate(self.tasks(configs), configs, name)

    def _simulate(self, st, configs: Configs, name: str) -> Prediction:
        res = self.sim.run(st.tasks)
        self.evaluations += 1
        feasible = self.memory_limit is None or st.memory <= self.memory_limit
        sent = sum(t.sent for t in st.tasks)
        return Prediction(name, configs, res.time, st.memory, sent, feasible, res.busy("compute"), res.busy("comm"),
                          self.split_degree)

    def predict_plan(self, plan, name: Optional[str] = None) -> Prediction:
        """:meth:`predict` for a whole :class:`~pyowt.parallel.plan.Plan`, its ``scheme``
        and ``fc_update`` included (OWT's schemes b and c are properties of the plan, not
        of any layer's config). Chains only: the DAG tasks model scheme a."""
        configs = tuple(plan.layers[n.name] for n in self.graph.weight_nodes)
        name = name or plan.name or "plan"
        if self.graph.is_chain and any("@" in c for c in configs) and not self.per_layer:
            # Layers with their own degrees: cost them in the per-layer space, with the
            # plan's split_degree written into every split layer that lacks one.
            configs = tuple(self.degree_config(c, plan.split_degree) for c in configs)
            plan = replace(plan, layers={n.name: c for n, c in zip(self.graph.weight_nodes, configs)},
                           split_degree=None)
            return self.for_per_layer().predict_plan(plan, name)
        if check_split_degree(plan.split_degree, self.k) != self.s:
            return self.for_split(plan.split_degree).predict_plan(plan, name)
        if not self.graph.is_chain:
            if plan.scheme != "a":
                raise ValueError(f"plan {name!r}: scheme {plan.scheme!r} is modelled for chain models only")
            return self.predict(configs, name)
        if not self.valid(configs):
            return Prediction(name, configs, math.inf, math.inf, 0, feasible=False, split_degree=self.split_degree)
        from .tasks import chain_tasks

        return self._simulate(chain_tasks(self.graph, plan, self.cost, self.k, 0, self.bucket_bytes), configs, name)

    def objective(self, configs: Configs) -> float:
        """Step time, with plans over the memory limit pushed above every feasible one."""
        p = self.predict(configs)
        if p.feasible:
            return p.time
        return p.time * (2.0 + p.memory / self.memory_limit) if math.isfinite(p.time) else math.inf

    def serial(self, configs: Configs) -> float:
        """Serialized step time (no overlap, one all-reduce per layer): the DP's objective."""
        return sum(t.duration for t in self.tasks(configs, granular=True).tasks)

    def segment_cost(self, i: int, prev: Optional[str], cur: str) -> float:
        """Serialized time of segment ``i`` (ops into weight layer i, and the layer) given the
        configs of layers i-1 and i; the tail after the last layer joins the last segment."""
        configs = [DATA] * len(self.cands)
        configs[i] = cur
        if prev is not None:
            configs[i - 1] = prev
        return sum(t.duration for t in self.tasks(tuple(configs), granular=True).tasks if t.segment == i)

    def segment_table(self):
        """:meth:`segment_cost` for every (layer, previous config, config) a chain DP asks
        for, from one task build per ordered pair of configs (a, b) instead of one per
        query: layers alternate a, b (a config a layer cannot take falls back to ``data``),
        and each build yields every segment at once, since a segment depends only on its
        own layer's and the previous layer's configs. Returns a ``seg_cost`` callable."""
        n = len(self.cands)
        cfgs = sorted({c for cs in self.cands for c in cs})
        table: Dict[Tuple[int, Optional[str], str], float] = {}
        for a in cfgs:
            for b in cfgs:
                configs = tuple(((a, b)[i % 2] if (a, b)[i % 2] in self.cands[i] else DATA) for i in range(n))
                terms: Dict[int, float] = {}
                for t in self.tasks(configs, granular=True).tasks:
                    terms[t.segment] = terms.get(t.segment, 0.0) + t.duration
                for i in range(n):
                    table[(i, configs[i - 1] if i else None, configs[i])] = terms.get(i, 0.0)

        def seg_cost(i: int, prev: Optional[str], cur: str) -> float:
            hit = table.get((i, prev, cur))
            return hit if hit is not None else self.segment_cost(i, prev, cur)

        return seg_cost

    def pairwise(self):
        """The serialized step time of a DAG as node and edge terms over weight nodes.

        Returns ``(node_cost, edges, edge_cost)`` for :func:`pyowt.planner.elimination.eliminate`:
        each term is the summed duration of the granular tasks tagged with that node or pair
        (:mod:`pyowt.planner.dag`). A term depends on its own nodes' configs only, so one
        task build yields every term at the configs it uses: the weight nodes are coloured
        so that neighbours differ (greedy), and every assignment of configs to colours is
        built once (3^colours builds, 27 for ResNet-50, instead of one per term and configs).
        """
        from .dag import dag_edges, pair_key

        n = len(self.cands)
        edges = dag_edges(self.graph)
        adj: Dict[int, set] = {i: set() for i in range(n)}
        for u, v in edges:
            adj[u].add(v)
            adj[v].add(u)
        colour: Dict[int, int] = {}
        for i in range(n):
            used = {colour[j] for j in adj[i] if j in colour}
            colour[i] = next(c for c in range(n + 1) if c not in used)
        ncol = max(colour.values()) + 1 if colour else 0
        node_tab: Dict[Tuple[int, str], float] = {}
        edge_tab: Dict[Tuple[int, int, str, str], float] = {}
        for assign in itertools.product((DATA, SPLIT_OUT, SPLIT_IN), repeat=ncol):
            configs = tuple(assign[colour[i]] if assign[colour[i]] in self.cands[i] else DATA for i in range(n))
            terms: Dict[int, float] = {}
            for t in self.tasks(configs, granular=True).tasks:
                terms[t.segment] = terms.get(t.segment, 0.0) + t.duration
            for i, c in enumerate(configs):
                node_tab[(i, c)] = terms.get(pair_key(i, i, n), 0.0)
            for u, v in edges:
                edge_tab[(u, v, configs[u], configs[v])] = terms.get(pair_key(u, v, n), 0.0)

        def node_cost(i: int, c: str) -> float:
            return node_tab[(i, c)]

        def edge_cost(u: int, v: int, a: str, b: str) -> float:
            return edge_tab[(u, v, a, b)]

        return node_cost, edges, edge_cost

    def eliminate(self) -> Tuple[Configs, float]:
        """Exact minimum of the serialized step time of a DAG (series-parallel) by elimination."""
        from .elimination import eliminate

        node_cost, edges, edge_cost = self.pairwise()
        x, v = eliminate({i: c for i, c in enumerate(self.cands)}, node_cost, edges, edge_cost)
        return tuple(x[i] for i in range(len(self.cands))), v

    def timeline(self, configs: Configs, devices: Optional[Sequence[int]] = None):
        """Full per-device simulation (every rank's own shard sizes)."""
        devices = range(self.k) if devices is None else devices
        lanes = [self.tasks(configs, rank=r).tasks for r in devices]
        return simulate(lanes, self.overlap)


@dataclass
class SearchResult:
    plan: Plan
    best: Prediction
    presets: Dict[str, Prediction]
    dp: Optional[Prediction]  # the chain DP's plan, or elimination's for a DAG
    search_time: float
    evaluations: int
    candidates: List[Prediction] = field(default_factory=list)


def _penalized(p: Prediction) -> float:
    return p.time if p.feasible else math.inf


def split_degrees(k: int) -> List[int]:
    """The split degrees worth searching on ``k`` workers: every divisor from 2 up (s = 1
    would split nothing: the all-data plan covers it)."""
    return [s for s in range(2, k + 1) if k % s == 0]


def search(graph: ModelGraph, cost: CostModel, k: int, memory_limit: Optional[float] = None,
           iters: int = 1500, time_budget: Optional[float] = None, seed: int = 0, bucket_mb: float = 25.0,
           overlap: Optional[bool] = None, hybrids: bool = True) -> SearchResult:
    """Find a plan for ``graph`` on ``k`` workers (see the module docstring).

    Args:
        memory_limit: bytes per device (default: the cluster device's memory).
        iters: MCMC proposals per refined split degree (all K, and the hybrid degree
            whose DP/OWT start is best); ``time_budget`` caps the seconds of each.
        hybrids: also search split degrees below ``k`` (:func:`split_degrees`); ``False``
            searches the split-over-all-K space only.
    """
    t0 = time.perf_counter()
    if memory_limit is None:
        memory_limit = cost.cluster.device.memory
    ev = Evaluator(graph, cost, k, bucket_mb, overlap, memory_limit)
    presets = {p: ev.predict(preset_configs(graph, p), p) for p in PRESET_NAMES}
    pool = list(presets.values())
    dp = None
    if graph.is_chain and hybrids and k > 1 and len(split_degrees(k)) > 1:
        return _search_per_layer(graph, ev, presets, k, iters, time_budget, seed, t0)
    degrees = (split_degrees(k) if hybrids else [k]) if k > 1 else [k]
    # Every split degree gets its exact serialized optimum (DP / elimination) and the OWT
    # preset at that degree; MCMC then refines the plain space (s = K) and the most
    # promising hybrid degree only (it is the expensive part: hundreds of simulations).
    starts = {}
    for s in sorted(degrees, reverse=True):  # s = K first: its DP plan is reported as ``dp``
        sub = ev.for_split(s)
        seeds = [presets["data"]]
        owt = sub.predict(preset_configs(graph, "owt")) if s != k else presets["owt"]
        if owt.feasible and math.isfinite(owt.time):
            seeds.append(owt)
        if k > 1:
            if graph.is_chain:
                configs, _ = dp_chain(sub.cands, sub.segment_table())
            else:  # series-parallel DAG: the same serialized objective, minimized by elimination
                configs, _ = sub.eliminate()
            found_dp = sub.predict(configs, "dp")
            dp = found_dp if dp is None else dp
            seeds.append(found_dp)
            pool.append(found_dp)
        starts[s] = (sub, seeds)
    hybrid = [s for s in starts if s != k]
    refine = [k] + ([min(hybrid, key=lambda s: min(_penalized(p) for p in starts[s][1][1:] or starts[s][1]))]
                    if hybrid else [])
    for s in refine:
        sub, seeds = starts[s]
        result = mcmc(sub.cands, sub.objective, [p.configs for p in seeds], iters=iters if k > 1 else 0, seed=seed,
                      time_budget=time_budget, patience=max(50, iters // 4))
        pool.append(sub.predict(result.configs, "auto"))
    best, plan = _pick_auto(graph, pool)
    evaluations = sum(e.evaluations for e in set(ev._others.values()))
    return SearchResult(plan, best, presets, dp, time.perf_counter() - t0, evaluations, pool)


def _pick_auto(graph: ModelGraph, pool: List[Prediction]) -> Tuple[Prediction, Plan]:
    """The fastest feasible prediction of ``pool``, renamed "auto", and its plan."""
    feasible = [p for p in pool if p.feasible and math.isfinite(p.time)]
    best = replace(min(feasible or pool, key=lambda p: p.time), name="auto")
    if all(c == DATA for c in best.configs):  # nothing is split: no subgroups needed
        best = replace(best, split_degree=None)
    return best, plan_from(graph, best.configs, "auto", split_degree=best.split_degree)


def _search_per_layer(graph, ev, presets, k, iters, time_budget, seed, t0) -> SearchResult:
    """Chains: one search over per-layer configs with every split degree (DP exact for the
    serialized objective, then MCMC seeded with data, the DP's plan, and OWT and the DP
    optimum of every single degree)."""
    full = ev.for_per_layer()
    configs, _ = dp_chain(full.cands, full.segment_table())
    dp = full.predict(configs, "dp")
    seeds = [presets["data"].configs, dp.configs]
    for s in split_degrees(k):
        # Each single degree's serialized optimum and OWT: the search starts from every
        # plan-wide hybrid, so its result is never worse than theirs.
        sub = ev.for_split(s)
        best_s, _ = dp_chain(sub.cands, sub.segment_table())
        for configs in (best_s, preset_configs(graph, "owt")):
            configs = tuple(full.degree_config(c, s) for c in configs)
            if full.valid(configs) and math.isfinite(full.predict(configs).time):
                seeds.append(configs)
    result = mcmc(full.cands, full.objective, seeds, iters=iters, seed=seed, time_budget=time_budget,
                  patience=max(50, iters // 4))
    pool = list(presets.values()) + [dp, full.predict(result.configs, "auto")]
    best, plan = _pick_auto(graph, pool)
    evaluations = sum(e.evaluations for e in set(ev._others.values()))
    return SearchResult(plan, best, presets, dp, time.perf_counter() - t0, evaluations, pool)


def auto_plan(model: nn.Module, group=None, input_shape: Optional[Sequence[int]] = None, *,
              cluster: Optional[ClusterSpec] = None, measure: bool = True, memory_limit: Optional[float] = None,
              iters: int = 1500, bucket_mb: float = 25.0, seed: int = 0, cache_dir=None,
              hybrids: bool = True) -> Plan:
    """The plan ``pyowt.parallelize(model, "auto")`` runs; call on every rank of ``group``.

    Args:
        model: the model (a chain, as parallelize needs).
        group: the process group (default: the world when torch.distributed is initialized,
            else a single worker).
        input_shape: the global batch's input shape (B, C, H, W). Required.
        cluster: hardware spec for estimates; default: this device, with costs measured.
        measure: measure compute on this device (every rank profiles the same ops at once,
            so a CPU host shared by the ranks is measured under the same contention) and
            collectives on ``group``; ``False`` uses ``cluster``'s roofline and links.
        memory_limit: bytes per device.
        hybrids: search split degrees below K too (needs the default group when measuring:
            the subgroups' collectives are fitted on groups created from the world).

    Every rank gets rank 0's plan (broadcast), so the ranks agree even when their
    measurements differ.
    """
    import torch
    import torch.distributed as dist

    from .. import distributed as pdist
    from .costs import Profiler, measure_comm
    from .specs import DEVICES, LINKS

    if input_shape is None:
        raise ValueError("auto_plan needs input_shape=(B, C, H, W), the global batch's input shape")
    live = dist.is_available() and dist.is_initialized()
    pg = pdist.resolve_group(group) if live else None
    k, rank = (pdist.get_world_size(pg), pdist.get_rank(pg)) if live else (1, 0)
    graph = capture(model, input_shape)
    if not graph.is_chain:
        raise ValueError(f"{type(model).__name__} is not a chain; pyowt.parallelize runs chains only")
    if cluster is None:
        on_gpu = live and pdist.get_backend(pg) == "nccl"
        cluster = ClusterSpec(DEVICES["h100" if on_gpu else "cpu"], k, LINKS["nvlink" if on_gpu else "ethernet"])
    elif cluster.workers != k:
        cluster = cluster.with_workers(k)
    profiler, fit, by_size = None, None, {}
    if measure:
        device = "cuda" if (live and pdist.get_backend(pg) == "nccl") or (not live and torch.cuda.is_available()) else "cpu"
        profiler = Profiler(device, cluster.dtype, cache_dir=cache_dir, context={"concurrent": k if device == "cpu" else 1})
        fit = measure_comm(pg) if live and k > 1 else None
        if fit is not None and pg is dist.group.WORLD:
            # Hybrids talk in subgroups: fit each proper group size on split groups, all
            # measuring at once as they would run (replica groups of that size reuse it).
            from ..parallel.mesh import Mesh

            for s in split_degrees(k)[:-1]:
                by_size[s] = measure_comm(Mesh(pg, s).split_group)
    cost = CostModel(cluster, profiler, fit, by_size)
    text = None
    if rank == 0 or profiler is not None:
        # Every rank runs the search when measuring, so that all profile the same ops at once.
        res = search(graph, cost, k, memory_limit, iters=iters, seed=seed, bucket_mb=bucket_mb, hybrids=hybrids)
        text = res.plan.to_json()
        if profiler is not None:
            profiler.save() if rank == 0 else None
    if live and k > 1:
        box = [text]
        dist.broadcast_object_list(box, src=dist.get_global_rank(pg, 0) if hasattr(dist, "get_global_rank") else 0, group=pg)
        text = box[0]
    return Plan.from_json(text)


__all__ = ["Evaluator", "PRESET_NAMES", "Prediction", "SearchResult", "auto_plan", "preset_configs", "search",
           "split_degrees"]
