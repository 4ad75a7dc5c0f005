"""``FusedConv2d`` (conv2d + bias + ReLU in one op) and ``fuse_conv_relu`` for whole models."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.backend import check_backend_name
from ..ops.conv2d import _activation, conv2d_bias_act


class FusedConv2d(nn.Conv2d):
    """``nn.Conv2d`` followed by ReLU, computed by :func:`pyowt.ops.conv2d_bias_act`.

    A drop-in for ``nn.Sequential(nn.Conv2d(...), nn.ReLU())``: same constructor
    arguments, parameter names (``weight`` (C_out, C_in/groups, kH, kW), ``bias`` (C_out,))
    and initialization as ``nn.Conv2d`` (it is a subclass), so a torchvision checkpoint
    loads into it unchanged. Note that ``isinstance(m, nn.Conv2d)`` holds while its output
    includes the activation.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
        padding_mode, device, dtype: as for ``nn.Conv2d``. String paddings ("same",
        "valid") and non-zero padding modes pad the input explicitly first.
        activation: ``"relu"`` (default) or ``None``/``"none"``.
        backend: forwarded to ``conv2d_bias_act`` (None: the default for the device).

    Shape: input ``(N, C_in, H, W)`` (NCHW or channels_last), output
    ``(N, C_out, H_out, W_out)`` in the input's memory format.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, activation: Optional[str] = "relu",
                 backend: Optional[str] = None, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self.activation = _activation(activation)
        self.backend = check_backend_name("conv2d_bias_act", backend, "FusedConv2d")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, activation: Optional[str] = "relu",
                  backend: Optional[str] = None) -> "FusedConv2d":
        """A FusedConv2d sharing ``conv``'s parameters (the same Parameter objects)."""
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                    bias=conv.bias is not None, activation=activation, backend=backend,
                    padding_mode=conv.padding_mode, device="meta")
        fused.weight = conv.weight
        fused.bias = conv.bias
        fused.train(conv.training)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if isinstance(padding, str) or self.padding_mode != "zeros":
            # nn.Conv2d's own rule for these paddings ("same" may be asymmetric).
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        return conv2d_bias_act(x, self.weight, self.bias, self.stride, padding, self.dilation,
                               self.groups, self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", activation={self.activation!r}"
        return s + (f", backend={self.backend!r}" if self.backend is not None else "")


def _fusable_conv(m: nn.Module) -> bool:
    if type(m) is nn.Conv2d:
        return True
    return isinstance(m, FusedConv2d) and m.activation == "none"


def fuse_conv_relu(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """A deep copy of ``model`` with every Conv2d -> ReLU pair fused into a FusedConv2d.

    Pairs are found as consecutive children of an ``nn.Sequential`` (at any depth), which
    covers torchvision's AlexNet and VGG. The conv is replaced by a FusedConv2d holding the
    copy's parameters and the ReLU by ``nn.Identity`` (so indices and ``state_dict`` keys
    stay the same). The result computes the same function; ``model`` is untouched.
    Convs followed by anything else, and ReLUs reached through ``forward`` code rather
    than a Sequential, are left as they are.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_conv_relu: model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend_name("conv2d_bias_act", backend, "fuse_conv_relu")
    fused = copy.deepcopy(model)
    for module in list(fused.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules.keys())
        for first, second in zip(names, names[1:]):
            conv, relu = module._modules[first], module._modules[second]
            if _fusable_conv(conv) and type(relu) is nn.ReLU:
                module._modules[first] = FusedConv2d.from_conv(conv, "relu", backend=backend)
                module._modules[second] = nn.Identity()
    return fused
