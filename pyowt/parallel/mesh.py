"""The K workers of a plan as a d x s mesh: data degree d, split degree s (K = d * s).

A plan's ``split_degree`` s says over how many workers its split layers (``split_out``,
``split_in``) divide their weights; the K / s = d groups of s workers then run those layers
data-parallel among themselves. Ranks are numbered row-major::

    rank = row * s + col        row in 0..d-1 (the batch block), col in 0..s-1 (the shard)

* the *split group* of a rank: the s consecutive ranks of its row. They hold one batch
  block together; transitions and the split layers' all-reduces run inside it. Consecutive
  ranks keep it inside a node whenever s divides the devices per node.
* the *replica group*: the d ranks of its column, which hold the same weight shard; the
  split layers' gradients are summed over it.

``data`` layers stay sharded over all K (their gradients summed over the whole group). With
s = K (the default, and what the presets use) the split group is the whole group and there
is no replica group: every layout is what it was before meshes existed.

Batch blocks: ``Shard(batch)`` gives rank r the rows ``tensor_split(B, K)[r]``; the block of
row j is the union of its s ranks' pieces, so gathering the batch inside a split group
yields exactly the block, for any B (its pieces are ``tensor_split(block, s)`` too: the
larger pieces of a ``tensor_split`` come first).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch.distributed as dist

from .. import distributed as pdist
from .layers import shard_range


def check_split_degree(split_degree: Optional[int], k: int) -> int:
    """The split degree s a plan asks for on K workers (``None``: K), validated."""
    if split_degree is None:
        return k
    if isinstance(split_degree, bool) or not isinstance(split_degree, int):
        raise TypeError(f"split_degree must be an int or None, got {type(split_degree).__name__}")
    if split_degree < 1 or k % split_degree:
        raise ValueError(f"split_degree must divide the {k} workers (one of "
                         f"{[s for s in range(1, k + 1) if k % s == 0]}), got {split_degree}")
    return split_degree


def block_range(batch: int, k: int, s: int, row: int) -> Tuple[int, int]:
    """(start, stop) of the global batch rows of row ``row``'s block (s ranks of K)."""
    return shard_range(batch, k, row * s)[0], shard_range(batch, k, row * s + s - 1)[1]


class Mesh:
    """The split and replica groups of this rank (see the module docstring).

    Attributes:
        k, s, d: workers, split degree, data degree (K = d * s).
        rank, row, col: this rank in the group, its row (batch block) and column (shard).
        split_group: the s ranks of this row (the whole group when s = K).
        replica_group: the d ranks of this column, or ``None`` when d = 1.
    """

    def __init__(self, group, s: int):
        self.group = group
        self.k, self.rank = pdist.get_world_size(group), pdist.get_rank(group)
        self.s = check_split_degree(s, self.k)
        self.d = self.k // self.s
        self.row, self.col = divmod(self.rank, self.s)
        if self.d == 1:
            self.split_group, self.replica_group = group, None
            return
        if group is not dist.group.WORLD:
            raise ValueError(f"split_degree {self.s} < {self.k} workers needs the default (world) group: "
                             "its split and replica subgroups are created with torch.distributed.new_group")
        self.split_group, self.replica_group = _subgroups(self.k, self.s, self.row, self.col)

    def block_range(self, batch: int) -> Tuple[int, int]:
        """(start, stop) of this rank's batch block in a global batch of ``batch`` rows."""
        return block_range(batch, self.k, self.s, self.row)

    def __repr__(self) -> str:
        return f"Mesh(k={self.k}, d={self.d}, s={self.s}, row={self.row}, col={self.col})"


# new_group is collective over the world and costs a rendezvous: create each mesh's groups
# once per world (tests and the planner parallelize the same model many times).
_GROUPS: Dict[Tuple[int, int, int], tuple] = {}


def _subgroups(k: int, s: int, row: int, col: int):
    world = dist.group.WORLD
    key = (id(world), k, s)
    hit = _GROUPS.get(key)
    if hit is None or hit[0] is not world:
        d = k // s
        # Every rank creates every group, in the same order, as new_group requires.
        rows = [dist.new_group(ranks=[r * s + c for c in range(s)]) for r in range(d)]
        cols = [dist.new_group(ranks=[r * s + c for r in range(d)]) for c in range(s)]
        hit = _GROUPS[key] = (world, rows, cols)
    return hit[1][row], hit[2][col]


__all__ = ["Mesh", "block_range", "check_split_degree"]
