"""Exact search over series-parallel graphs by node and edge elimination (as FlexFlow does).

The objective is a sum of per-node and per-edge terms::

    cost(x) = sum_v node_cost(v, x_v) + sum_(u, v) edge_cost(u, v, x_u, x_v)

(the chain DP's objective is the special case of a path). Elimination repeats two moves:

* **edge elimination**: parallel edges between the same two nodes become one edge whose
  table is the sum of their tables (done as edges are added);
* **node elimination**: a node with exactly two neighbours ``u`` and ``w`` (on a DAG, one
  in-edge and one out-edge once parallel edges are merged) is removed, and the edge
  ``(u, w)`` gets the table ``min_c [E(u,v)[a,c] + N(v)[c] + E(v,w)[c,b]]`` (the argmin is kept
  for back-tracking). A node with one neighbour folds into that neighbour's node table,
  a node with none is minimized alone (both are the same move with fewer terms).

The objective does not depend on edge direction, so neither move needs it. When no node
can be removed, the remaining nodes (two for a series-parallel graph) are enumerated, and the
eliminated nodes get their configs by back-tracking in reverse elimination order. Every
move preserves the minimum exactly, so the result is the global optimum; a graph that is
not series-parallel stops with more nodes left and is enumerated if small enough, else a
``ValueError`` is raised.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Dict, Hashable, List, Mapping, Sequence, Tuple

Node = Hashable


class _Edges:
    """Undirected edge tables keyed by an ordered node pair; parallel edges are summed."""

    def __init__(self, order: Dict[Node, int]):
        self.order = order
        self.tables: Dict[Tuple[Node, Node], Dict[Tuple[str, str], float]] = {}
        self.adj: Dict[Node, set] = {v: set() for v in order}

    def add(self, u: Node, v: Node, table: Dict[Tuple[str, str], float]) -> None:
        if self.order[u] > self.order[v]:
            u, v = v, u
            table = {(b, a): t for (a, b), t in table.items()}
        old = self.tables.get((u, v))
        if old is None:
            self.tables[(u, v)] = dict(table)
            self.adj[u].add(v)
            self.adj[v].add(u)
        else:  # edge elimination: parallel edges merge by adding their tables
            for key, t in table.items():
                old[key] += t

    def get(self, u: Node, v: Node, a: str, b: str) -> float:
        if self.order[u] > self.order[v]:
            return self.tables[(v, u)][(b, a)]
        return self.tables[(u, v)][(a, b)]

    def remove_node(self, v: Node) -> None:
        for u in self.adj.pop(v):
            self.adj[u].discard(v)
            self.tables.pop((u, v) if self.order[u] < self.order[v] else (v, u))


def eliminate(cands: Mapping[Node, Sequence[str]], node_cost: Callable[[Node, str], float],
              edges: Sequence[Tuple[Node, Node]], edge_cost: Callable[[Node, Node, str, str], float],
              max_enumerate: int = 100_000) -> Tuple[Dict[Node, str], float]:
    """Exact minimum of the pairwise objective (see the module docstring).

    Args:
        cands: allowed configs per node (insertion order breaks ties: the first is preferred).
        node_cost: ``node_cost(v, c)``.
        edges: node pairs; repeated pairs are parallel edges (their costs add up).
        edge_cost: ``edge_cost(u, v, c_u, c_v)`` for each listed edge ``(u, v)``.
        max_enumerate: most config combinations of the nodes left after elimination.

    Returns:
        (configs per node, minimum cost). ``node_cost`` is called C times per node and
        ``edge_cost`` C^2 times per listed edge; elimination itself is O(nodes * C^3).
    """
    order = {v: i for i, v in enumerate(cands)}
    for v, cs in cands.items():
        if not cs:
            raise ValueError(f"node {v!r} has no candidate configs")
    for u, v in edges:
        if u not in order or v not in order:
            raise ValueError(f"edge ({u!r}, {v!r}) names a node not in cands")
        if u == v:
            raise ValueError(f"edge ({u!r}, {v!r}) is a self-loop")
    ntab: Dict[Node, Dict[str, float]] = {v: {c: node_cost(v, c) for c in cs} for v, cs in cands.items()}
    E = _Edges(order)
    for u, v in edges:
        E.add(u, v, {(a, b): edge_cost(u, v, a, b) for a in cands[u] for b in cands[v]})
    alive = dict.fromkeys(cands)  # insertion-ordered set
    trail: List[tuple] = []  # (node, neighbours, argmin table), in elimination order
    changed = True
    while changed and len(alive) > 2:
        changed = False
        for v in list(alive):
            nb = sorted(E.adj[v], key=order.__getitem__)
            if len(nb) > 2 or len(alive) <= 2:
                continue
            cs = cands[v]
            if len(nb) == 2:
                u, w = nb
                table, arg = {}, {}
                for a in cands[u]:
                    for b in cands[w]:
                        best = min(cs, key=lambda c: E.get(u, v, a, c) + ntab[v][c] + E.get(v, w, c, b))
                        table[(a, b)] = E.get(u, v, a, best) + ntab[v][best] + E.get(v, w, best, b)
                        arg[(a, b)] = best
                E.remove_node(v)
                E.add(u, w, table)
            elif len(nb) == 1:
                (u,) = nb
                arg = {}
                for a in cands[u]:
                    best = min(cs, key=lambda c: E.get(u, v, a, c) + ntab[v][c])
                    arg[(a,)] = best
                    ntab[u][a] += E.get(u, v, a, best) + ntab[v][best]
                E.remove_node(v)
            else:
                best = min(cs, key=ntab[v].__getitem__)
                arg = {(): best}
                # its cost is constant from now on: keep it as the first remaining node's offset
                rest = next(x for x in alive if x != v)
                for a in ntab[rest]:
                    ntab[rest][a] += ntab[v][best]
                E.remove_node(v)
            trail.append((v, tuple(nb), arg))
            del alive[v]
            changed = True
    left = list(alive)
    combos = math.prod(len(cands[v]) for v in left)
    if combos > max_enumerate:
        raise ValueError(f"the graph is not series-parallel: {len(left)} nodes remain after elimination "
                         f"({combos} combinations > max_enumerate={max_enumerate})")
    rem_edges = list(E.tables)
    best_x, best_v = None, math.inf
    for combo in itertools.product(*(cands[v] for v in left)):
        x = dict(zip(left, combo))
        val = sum(ntab[v][x[v]] for v in left) + sum(E.tables[(u, w)][(x[u], x[w])] for u, w in rem_edges)
        if val < best_v:
            best_x, best_v = x, val
    for v, nb, arg in reversed(trail):  # back-tracking
        best_x[v] = arg[tuple(best_x[u] for u in nb)]
    return {v: best_x[v] for v in cands}, best_v


def pairwise_cost(x: Mapping[Node, str], node_cost: Callable[[Node, str], float],
                  edges: Sequence[Tuple[Node, Node]], edge_cost: Callable[[Node, Node, str, str], float]) -> float:
    """The pairwise objective at ``x`` (for checks)."""
    return sum(node_cost(v, c) for v, c in x.items()) + sum(edge_cost(u, v, x[u], x[v]) for u, v in edges)


__all__ = ["eliminate", "pairwise_cost"]
