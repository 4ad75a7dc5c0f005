"""Searching for a plan: exact DP over chains, Metropolis-Hastings MCMC for any graph.

The configs a weight layer may take are pyowt's three (``data``, ``split_out``,
``split_in``), minus the splits a layer cannot take (fewer channels than workers).

* :func:`dp_chain` minimizes a chain objective that is a sum of per-layer segment costs,
  each depending on two neighbouring configs (Viterbi; exact). For plans, the segment cost
  is the serialized time of the ops leading into a layer and of the layer (forward,
  backward, its own gradient all-reduce and optimizer step; :func:`chain_tasks` with
  ``granular=True``): the step time with no overlap. :func:`brute_force` checks it.
* :func:`mcmc` explores configs with the simulator's step time (communication overlapping
  compute, bucketed gradient all-reduce), a move changing one layer's config, accepted with
  probability ``exp(-beta * relative increase)``; plans over the memory limit are penalized.
  It is seeded with data parallelism, OWT and the DP's plan.
"""
from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..parallel.layout import DATA, SPLIT_IN, SPLIT_OUT, format_config
from ..parallel.plan import Plan
from .capture import ModelGraph

Configs = Tuple[str, ...]


def candidates(graph: ModelGraph, k: int, degrees: Optional[Sequence[int]] = None) -> List[List[str]]:
    """Configs each weight layer (in order) can take when splits span ``k`` workers (the
    split degree: all workers, or a hybrid's split group). With ``degrees`` (divisors of
    ``k``), every layer may also split over groups of each of them: ``"split_out@2"``
    (degree ``k`` is written plainly)."""
    out = []
    for n in graph.weight_nodes:
        cin, cout = n.channels
        c = [DATA]
        for s in ([k] if degrees is None else sorted(degrees, reverse=True)):
            degree = None if (degrees is None or s == k) else s
            if s > 1 and cout >= s:
                c.append(format_config(SPLIT_OUT, degree))
            if s > 1 and cin >= s:
                c.append(format_config(SPLIT_IN, degree))
        out.append(c)
    return out


def dp_chain(cands: Sequence[Sequence[str]], seg_cost: Callable[[int, Optional[str], str], float]) -> Tuple[Configs, float]:
    """Exact minimum of ``sum_i seg_cost(i, c_{i-1}, c_i)`` (``c_{-1}`` is None).

    Returns (configs, cost). O(n * C^2) calls of ``seg_cost``.
    """
    if not cands:
        raise ValueError("dp_chain needs at least one layer")
    best: Dict[str, Tuple[float, Configs]] = {c: (seg_cost(0, None, c), (c,)) for c in cands[0]}
    for i in range(1, len(cands)):
        nxt = {}
        for c in cands[i]:
            nxt[c] = min(((v + seg_cost(i, cp, c), path + (c,)) for cp, (v, path) in best.items()), key=lambda t: t[0])
        best = nxt
    v, path = min(best.values(), key=lambda t: t[0])
    return path, v


def brute_force(cands: Sequence[Sequence[str]], objective: Callable[[Configs], float]) -> Tuple[Configs, float]:
    """Minimum of ``objective`` over every combination (for tests on small chains)."""
    return min(((c, objective(c)) for c in itertools.product(*cands)), key=lambda t: t[1])


@dataclass
class MCMCResult:
    configs: Configs
    cost: float
    evaluations: int
    accepted: int
    trace: List[float] = field(default_factory=list)


def mcmc(cands: Sequence[Sequence[str]], objective: Callable[[Configs], float], seeds: Sequence[Configs],
         iters: int = 2000, beta: float = 30.0, seed: int = 0, time_budget: Optional[float] = None,
         patience: Optional[int] = None) -> MCMCResult:
    """Metropolis-Hastings over configs, starting from each of ``seeds`` in turn.

    Args:
        cands: allowed configs per layer.
        objective: cost of a config tuple (memoized here).
        seeds: starting points; the iteration budget is shared evenly among them.
        iters: proposals in all.
        beta: inverse temperature on the relative cost change.
        time_budget: stop after this many seconds.
        patience: restart from the next seed after this many proposals without a new best.
    """
    rng = random.Random(seed)
    memo: Dict[Configs, float] = {}

    def f(c):
        v = memo.get(c)
        if v is None:
            v = memo[c] = objective(c)
        return v

    movable = [i for i, c in enumerate(cands) if len(c) > 1]
    best_c, best_v = None, math.inf
    accepted, trace = 0, []
    t0 = time.perf_counter()
    per_seed = max(1, iters // max(1, len(seeds)))
    for s in seeds:
        cur = tuple(s)
        cur_v = f(cur)
        if cur_v < best_v:
            best_c, best_v = cur, cur_v
        since = 0
        for _ in range(per_seed if movable else 0):
            i = rng.choice(movable)
            new = list(cur)
            new[i] = rng.choice([c for c in cands[i] if c != cur[i]])
            new = tuple(new)
            v = f(new)
            if v <= cur_v or rng.random() < math.exp(-beta * (v - cur_v) / max(cur_v, 1e-30)):
                cur, cur_v = new, v
                accepted += 1
            since += 1
            if cur_v < best_v:
                best_c, best_v, since = cur, cur_v, 0
            trace.append(best_v)
            if patience is not None and since >= patience:
                break
            if time_budget is not None and time.perf_counter() - t0 > time_budget:
                break
    return MCMCResult(best_c, best_v, len(memo), accepted, trace)


def plan_from(graph: ModelGraph, configs: Configs, name: str = "auto", split_degree: Optional[int] = None) -> Plan:
    """A :class:`Plan` with ``configs`` for the graph's weight layers in order."""
    return Plan({n.name: c for n, c in zip(graph.weight_nodes, configs)}, name=name, split_degree=split_degree)


__all__ = ["MCMCResult", "brute_force", "candidates", "dp_chain", "mcmc", "plan_from"]
