"""Model-parallel fully-connected layers: weights split by output or by input features.

With K ranks in ``group`` and feature counts split as ``torch.tensor_split`` does (the first
``n mod K`` ranks hold one more; any K up to the feature count works):

* :class:`ColumnParallelLinear` (split by output): input Replicate, output Shard(feature)
  (or gathered to Replicate). The input enters through ``copy_to_group``, so its gradient,
  a partial sum on each rank, is all-reduced.
* :class:`RowParallelLinear` (split by input): input Shard(feature), output Partial, summed
  by an all-reduce (Replicate) or a reduce-scatter (Shard); the bias is added once, after
  the sum.

Column then row is the classic two-layer pattern: one all-reduce in the forward (row's
output) and one in the backward (column's input gradient), nothing in between.

Both initialize exactly as a single-process ``nn.Linear(in_features, out_features)`` under
the same RNG state would (they build the full weight with nn.Linear's own calls and keep
their shard), so a parallel model and its single-process twin start equal; ``from_linear``
and ``to_linear`` convert both ways exactly.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from .. import distributed as pdist
from ..distributed.accounting import split_sizes
from ..ops import linear_bias_act

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]


def _check_features(cls: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{cls}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{cls}: {name} must be >= 1, got {value}")
    return value


def _shard_sizes(cls: str, name: str, n: int, k: int) -> List[int]:
    if n < k:
        raise ValueError(f"{cls}: cannot split {name}={n} over {k} ranks (each rank needs at "
                         f"least one feature); use a group of at most {n} ranks")
    return split_sizes(n, k)


def _check_input(cls: str, x, expected: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{cls}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != expected:
        raise ValueError(f"{cls}: expected input with last dim {expected} ({what}), got shape "
                         f"{tuple(x.shape)}")


def _full_linear(in_features, out_features, bias, device, dtype) -> nn.Linear:
    # nn.Linear's own initialization, so the RNG is consumed exactly as a single process does.
    return nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)


class ColumnParallelLinear(nn.Module):
    """``y = act(x @ W^T + b)`` with W and b split by output feature across ``group``.

    Args:
        in_features, out_features: the full layer's sizes; rank r holds
            ``out_sizes[r]`` rows of the weight (``torch.tensor_split`` sizes).
        bias: whether the layer has a bias (split like the rows).
        activation: ``"relu"`` or None, fused into the GEMM.
        gather_output: all-gather the output features, so every rank gets the full
            ``(..., out_features)``; else each rank returns its ``(..., out_sizes[r])``.
        group: None (world), a ProcessGroup or a 1-D DeviceMesh.
        device, dtype: of the parameters, as for nn.Linear.

    Shapes: input ``(..., in_features)``, the same on every rank.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: Optional[str] = None, gather_output: bool = False, group=None,
                 device=None, dtype=None, *, _init: bool = True):
        super().__init__()
        cls = type(self).__name__
        self.in_features = _check_features(cls, "in_features", in_features)
        self.out_features = _check_features(cls, "out_features", out_features)
        if activation not in (None, "relu"):
            raise ValueError(f"{cls}: activation must be 'relu' or None, got {activation!r}")
        self.activation = activation
        self.gather_output = bool(gather_output)
        self.group = group
        self.k = pdist.get_world_size(group)
        self.rank = pdist.get_rank(group)
        self.out_sizes = _shard_sizes(cls, "out_features", out_features, self.k)
        self.offset = sum(self.out_sizes[:self.rank])
        n = self.out_sizes[self.rank]
        self.weight = nn.Parameter(torch.empty(n, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(n, device=device, dtype=dtype)) if bias else None
        if _init:
            full = _full_linear(in_features, out_features, bias, device, dtype)
            self._load_full(full.weight, full.bias)

    def _load_full(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        n = self.out_sizes[self.rank]
        with torch.no_grad():
            self.weight.copy_(weight.detach().narrow(0, self.offset, n))
            if self.bias is not None:
                self.bias.copy_(bias.detach().narrow(0, self.offset, n))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, activation: Optional[str] = None,
                    gather_output: bool = False) -> "ColumnParallelLinear":
        """This rank's shard of ``linear`` (same values, same dtype and device)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear expects an nn.Linear, got {type(linear).__name__}")
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, activation,
                gather_output, group, device=linear.weight.device, dtype=linear.weight.dtype, _init=False)
        m._load_full(linear.weight, linear.bias)
        return m

    def to_linear(self) -> nn.Linear:
        """The full layer as a plain nn.Linear, on every rank (gathers the shards)."""
        with torch.no_grad():
            w = pdist.all_gather(self.weight.detach(), dim=0, group=self.group, grad="split",
                                 sizes=self.out_sizes)
            b = (pdist.all_gather(self.bias.detach(), dim=0, group=self.group, grad="split",
                                  sizes=self.out_sizes) if self.bias is not None else None)
            linear = nn.Linear(self.in_features, self.out_features, bias=b is not None,
                               device=w.device, dtype=w.dtype)
            linear.weight.copy_(w)
            if b is not None:
                linear.bias.copy_(b)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(type(self).__name__, x, self.in_features, "in_features, replicated")
        x = pdist.copy_to_group(x, group=self.group)
        y = linear_bias_act(x, self.weight, self.bias, self.activation)
        if self.gather_output:
            y = pdist.all_gather(y, dim=-1, group=self.group, grad="split", sizes=self.out_sizes)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(this rank: {self.out_sizes[self.rank]} of {self.k} shards), bias={self.bias is not None}, "
                f"activation={self.activation}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """``y = x @ W^T + b`` with W split by input feature across ``group``.

    Args:
        in_features, out_features: the full layer's sizes; rank r holds
            ``in_sizes[r]`` columns of the weight (``torch.tensor_split`` sizes).
        bias: whether the layer has a bias, added once, after the sum: replicated with
            ``"all_reduce"``, split like the output features with ``"reduce_scatter"``.
        input_is_parallel: the input is already this rank's feature shard
            ``(..., in_sizes[r])``; if False the input is the full ``(..., in_features)``,
            the same on every rank, and is split first.
        reduce_output: ``"all_reduce"``: every rank gets the full ``(..., out_features)``;
            ``"reduce_scatter"``: each rank gets its ``torch.tensor_split`` share of the
            output features ``(..., out_sizes[r])``.
        group: None (world), a ProcessGroup or a 1-D DeviceMesh.
        device, dtype: of the parameters, as for nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 input_is_parallel: bool = True, reduce_output: str = "all_reduce", group=None,
                 device=None, dtype=None, *, _init: bool = True):
        super().__init__()
        cls = type(self).__name__
        self.in_features = _check_features(cls, "in_features", in_features)
        self.out_features = _check_features(cls, "out_features", out_features)
        if reduce_output not in ("all_reduce", "reduce_scatter"):
            raise ValueError(f"{cls}: reduce_output must be 'all_reduce' or 'reduce_scatter', got {reduce_output!r}")
        self.input_is_parallel = bool(input_is_parallel)
        self.reduce_output = reduce_output
        self.group = group
        self.k = pdist.get_world_size(group)
        self.rank = pdist.get_rank(group)
        self.in_sizes = _shard_sizes(cls, "in_features", in_features, self.k)
        self.offset = sum(self.in_sizes[:self.rank])
        if reduce_output == "reduce_scatter":
            # The output, hence the bias, is split by feature; a replicated bias would get
            # gradient only in this rank's slice and the copies would drift apart.
            self.out_sizes = _shard_sizes(cls, "out_features", out_features, self.k)
            self.out_offset = sum(self.out_sizes[:self.rank])
            n_bias = self.out_sizes[self.rank]
        else:
            self.out_sizes, self.out_offset, n_bias = None, 0, out_features
        self.weight = nn.Parameter(torch.empty(out_features, self.in_sizes[self.rank], device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(n_bias, device=device, dtype=dtype)) if bias else None
        if _init:
            full = _full_linear(in_features, out_features, bias, device, dtype)
            self._load_full(full.weight, full.bias)

    def _load_full(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        with torch.no_grad():
            self.weight.copy_(weight.detach().narrow(1, self.offset, self.in_sizes[self.rank]))
            if self.bias is not None:
                self.bias.copy_(bias.detach().narrow(0, self.out_offset, self.bias.shape[0]))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, input_is_parallel: bool = True,
                    reduce_output: str = "all_reduce") -> "RowParallelLinear":
        """This rank's shard of ``linear`` (same values, same dtype and device)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear expects an nn.Linear, got {type(linear).__name__}")
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, input_is_parallel,
                reduce_output, group, device=linear.weight.device, dtype=linear.weight.dtype, _init=False)
        m._load_full(linear.weight, linear.bias)
        return m

    def to_linear(self) -> nn.Linear:
        """The full layer as a plain nn.Linear, on every rank (gathers the shards)."""
        with torch.no_grad():
            w = pdist.all_gather(self.weight.detach(), dim=1, group=self.group, grad="split",
                                 sizes=self.in_sizes)
            b = self.bias.detach() if self.bias is not None else None
            if b is not None and self.out_sizes is not None:
                b = pdist.all_gather(b, dim=0, group=self.group, grad="split", sizes=self.out_sizes)
            linear = nn.Linear(self.in_features, self.out_features, bias=b is not None,
                               device=w.device, dtype=w.dtype)
            linear.weight.copy_(w)
            if b is not None:
                linear.bias.copy_(b)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = type(self).__name__
        if self.input_is_parallel:
            _check_input(cls, x, self.in_sizes[self.rank],
                         f"this rank's shard of in_features={self.in_features} over {self.k} ranks")
        else:
            _check_input(cls, x, self.in_features, "in_features, replicated")
            x = pdist.split(x, dim=x.dim() - 1, group=self.group)
        partial = linear_bias_act(x, self.weight, None, None)
        if self.reduce_output == "all_reduce":
            y = pdist.all_reduce(partial, group=self.group)
        else:
            y = pdist.reduce_scatter(partial, dim=partial.dim() - 1, group=self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (this rank: {self.in_sizes[self.rank]} of {self.k} shards), "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, reduce_output={self.reduce_output}")
