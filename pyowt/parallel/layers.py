"""A Conv2d or Linear under a parallel config: this rank's weight shard and its local compute.

The layers communicate only where the config itself requires it (``split_in`` sums its
partial output across the group); moving activations between layouts is the job of the
transitions that :func:`pyowt.parallelize` inserts between layers.

Shards follow ``torch.tensor_split``: rank r of K holds rows ``tensor_split(range(n), K)[r]``,
so any K works, including K that does not divide the channel count.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import distributed as pdist
from ..ops import bias_relu, conv2d_bias_act, linear_bias_act
from .layout import DATA, SPLIT_IN, SPLIT_OUT


def shard_range(n: int, k: int, rank: int):
    """(start, stop) of rank's slice of ``n`` items split as ``torch.tensor_split`` does."""
    base, extra = divmod(n, k)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _shard(t: torch.Tensor, dim: int, k: int, rank: int) -> torch.Tensor:
    start, stop = shard_range(t.shape[dim], k, rank)
    return t.detach().narrow(dim, start, stop - start).clone()


class ShardedLayer(nn.Module):
    """Base of the sharded Conv2d/Linear (see :class:`ShardedConv2d`, :class:`ShardedLinear`).

    Attributes:
        config: ``"data" | "split_out" | "split_in"``.
        activation: ``"relu"`` when a following ReLU was fused in, else ``None``.
        full_weight_shape: the unsplit weight's shape, for checkpoints and accounting.
    """

    shard_dims = {SPLIT_OUT: 0, SPLIT_IN: 1}
    channel_dim = 1  # of the activations
    degree = None  # the split degree whose groups hold the shards (None: the whole group)

    def __init__(self, source: nn.Module, config: str, activation: Optional[str], group, name: str):
        super().__init__()
        self.config, self.activation, self.name, self.group = config, activation, name, group
        self.k = pdist.get_world_size(group)
        self.rank = pdist.get_rank(group)
        self.full_weight_shape = tuple(source.weight.shape)
        self.has_bias = source.bias is not None
        w = source.weight.detach()
        if config == DATA:
            weight = w.clone()
        else:
            n = w.shape[self.shard_dims[config]]
            if n < self.k:
                kind = "output" if config == SPLIT_OUT else "input"
                raise ValueError(f"layer {name!r}: cannot split {n} {kind} channels over {self.k} workers "
                                 f"(plan config {config!r}); use 'data' for it or fewer workers")
            weight = _shard(w, self.shard_dims[config], self.k, self.rank)
        self.weight = nn.Parameter(weight, requires_grad=source.weight.requires_grad)
        if self.has_bias:
            b = source.bias.detach()
            bias = _shard(b, 0, self.k, self.rank) if config == SPLIT_OUT else b.clone()
            self.bias = nn.Parameter(bias, requires_grad=source.bias.requires_grad)
        else:
            self.register_parameter("bias", None)

    @property
    def out_channels(self) -> int:
        return self.full_weight_shape[0]

    def local_out_range(self):
        """(start, stop) of the output channels this rank produces (all of them unless split_out)."""
        if self.config == SPLIT_OUT:
            return shard_range(self.out_channels, self.k, self.rank)
        return 0, self.out_channels

    def extra_repr(self) -> str:
        return f"{self.name!r}, config={self.config}, weight={tuple(self.weight.shape)} of {self.full_weight_shape}, activation={self.activation}"

    def _compute(self, x, bias, activation):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config != SPLIT_IN:
            return self._compute(x, self.bias, self.activation)
        # Partial sums over this rank's input channels; the bias and the activation are
        # applied once, after the sum.
        y = pdist.all_reduce(self._compute(x, None, None), group=self.group)
        if self.bias is None:
            return torch.relu(y) if self.activation == "relu" else y
        if self.activation == "relu":
            return bias_relu(y, self.bias, dim=self.channel_dim)
        shape = [1] * y.dim()
        shape[self.channel_dim] = -1
        return y + self.bias.view(shape)


class ShardedConv2d(ShardedLayer):
    """Conv2d shard: ``split_out`` splits the out-channels, ``split_in`` the in-channels."""

    def __init__(self, source: nn.Conv2d, config, activation, group, name):
        super().__init__(source, config, activation, group, name)
        self.stride, self.padding, self.dilation = source.stride, source.padding, source.dilation

    def _compute(self, x, bias, activation):
        return conv2d_bias_act(x, self.weight, bias, stride=self.stride, padding=self.padding,
                               dilation=self.dilation, activation=activation)


class ShardedLinear(ShardedLayer):
    """Linear shard: ``split_out`` is column-parallel, ``split_in`` row-parallel."""

    channel_dim = -1

    def _compute(self, x, bias, activation):
        return linear_bias_act(x, self.weight, bias, activation=activation)


def unshard(layer: ShardedLayer, param: torch.Tensor, which: str) -> torch.Tensor:
    """The full (unsplit) value of ``layer``'s ``which`` ("weight" or "bias") from every
    rank's shard; the result is the same on every rank. ``param`` is this rank's tensor."""
    if layer.config == DATA or (which == "bias" and layer.config == SPLIT_IN):
        return param.detach().clone()
    dim = 0 if which == "bias" else layer.shard_dims[layer.config]
    with torch.no_grad():
        return pdist.all_gather(param.detach(), dim=dim, group=layer.group, grad="split").clone()


def reshard(layer: ShardedLayer, full: torch.Tensor, which: str) -> torch.Tensor:
    """This rank's piece of a full ``weight``/``bias`` for ``layer``."""
    if layer.config == DATA or (which == "bias" and layer.config == SPLIT_IN):
        return full.detach().clone()
    dim = 0 if which == "bias" else layer.shard_dims[layer.config]
    return _shard(full, dim, layer.k, layer.rank)


__all__ = ["ShardedConv2d", "ShardedLinear", "ShardedLayer", "shard_range", "unshard", "reshard"]
