"""Layout transitions as modules, so a parallelized model prints where it communicates.

Each wraps one autograd collective of :mod:`pyowt.distributed`; the choice of backward
(``grad``) is made when the transition is planned, from what the consumer's gradient will be:
``Partial`` after a ``split_out`` layer (reduce-scatter/all-reduce it), exact otherwise.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed as pdist


class AllGather(nn.Module):
    """Shard(dim) -> Replicate; backward reduce-scatter (Partial consumer gradient) or split."""

    def __init__(self, dim: int, grad: str, group):
        super().__init__()
        self.dim, self.grad, self.group = dim, grad, group

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grad={self.grad!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pdist.all_gather(x, dim=self.dim, group=self.group, grad=self.grad)


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
