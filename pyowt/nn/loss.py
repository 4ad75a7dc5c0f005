"""The class-parallel cross-entropy as a module (see :func:`pyowt.nn.functional.parallel_cross_entropy`)."""
from __future__ import annotations

import torch
from torch import nn

from .functional import REDUCTIONS, parallel_cross_entropy

__all__ = ["ParallelCrossEntropy"]


class ParallelCrossEntropy(nn.Module):
    """Softmax cross-entropy over logits sharded by class across ``group``.

    ``forward(logits_shard (B, n_r), target (B,))`` equals ``F.cross_entropy`` on the
    concatenated logits (values and gradients) without gathering them; the result is the
    same on every rank. Put it after a :class:`~pyowt.nn.ColumnParallelLinear` with
    ``gather_output=False``, whose output shards are exactly what it expects.

    Args:
        group: None (world), a ProcessGroup or a 1-D DeviceMesh.
        reduction: ``"mean"`` (over non-ignored targets), ``"sum"`` or ``"none"``.
        ignore_index: targets with this value contribute neither loss nor gradient.
    """

    def __init__(self, group=None, reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"ParallelCrossEntropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.group = group
        self.reduction = reduction
        self.ignore_index = int(ignore_index)

    def forward(self, logits_shard: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return parallel_cross_entropy(logits_shard, target, group=self.group, reduction=self.reduction,
                                      ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, ignore_index={self.ignore_index}"
