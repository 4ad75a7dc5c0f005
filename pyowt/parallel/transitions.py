"""Layout transitions as modules, so a parallelized model prints where it communicates.

Each wraps one autograd collective of :mod:`pyowt.distributed`; the choice of backward
(``grad``) is made when the transition is planned, from what the consumer's gradient will be:
``Partial`` after a ``split_out`` layer (reduce-scatter/all-reduce it), exact otherwise.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import distributed as pdist


class AllGather(nn.Module):
    """Shard(dim) -> Replicate; backward reduce-scatter (Partial consumer gradient) or split.

    ``total`` returns the full size along ``dim`` (known to the plan: the global batch, or a
    layer's channel count), so the per-rank sizes need no exchange at run time.
    """

    def __init__(self, dim: int, grad: str, group, total: Callable[[], int]):
        super().__init__()
        self.dim, self.grad, self.group, self.total = dim, grad, group, total
        self.k = pdist.get_world_size(group)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grad={self.grad!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = pdist.split_sizes(self.total(), self.k)
        return pdist.all_gather(x, dim=self.dim, group=self.group, grad=self.grad, sizes=sizes)


class Split(nn.Module):
    """Replicate -> Shard(dim) (this rank's ``tensor_split`` piece); backward all-gather."""

    def __init__(self, dim: int, group):
        super().__init__()
        self.dim, self.group = dim, group

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pdist.split(x, dim=self.dim, group=self.group)


class CopyToGroup(nn.Module):
    """Replicate -> Replicate whose consumer returns a Partial gradient: identity forward,
    all-reduce backward."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pdist.copy_to_group(x, group=self.group)
