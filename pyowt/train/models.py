"""The models ``pyowt train --model`` names: small, alexnet, vgg11, or ``module:callable``."""
from __future__ import annotations

import importlib
import inspect

import torch
from torch import nn

from .errors import UserError

BUILTIN_MODELS = ("small", "alexnet", "vgg11")


def _first_conv_for(model: nn.Module, in_channels: int) -> None:
    # torchvision's models take RGB; grayscale data gets a first conv of the same geometry.
    conv = model.features[0]
    if conv.in_channels != in_channels:
        model.features[0] = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                      conv.padding, bias=conv.bias is not None)


def build_model(name: str, num_classes: int, in_channels: int, seed: int) -> nn.Module:
    """A freshly initialized model (the same on every rank for the same ``seed``).

    ``name``: ``small`` (:class:`pyowt.models.AlexNetSmall`), ``alexnet`` or ``vgg11``
    (torchvision's, untrained), or ``package.module:callable``, called as
    ``callable(num_classes=N)`` plus ``in_channels=C`` when it accepts that argument.
    """
    torch.manual_seed(seed)
    if name == "small":
        from ..models import AlexNetSmall

        return AlexNetSmall(num_classes=num_classes, in_channels=in_channels)
    if name in ("alexnet", "vgg11"):
        try:
            import torchvision
        except ImportError as e:
            raise UserError(f"--model {name} needs torchvision: pip install torchvision") from e
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        _first_conv_for(model, in_channels)
        return model
    if ":" not in name:
        raise UserError(f"--model: unknown model {name!r}; expected one of {', '.join(BUILTIN_MODELS)} "
                        "or package.module:callable")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"--model {name}: cannot import module {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"--model {name}: module {module_name!r} has no callable {attr!r}")
    kwargs = {"num_classes": num_classes}
    try:
        if "in_channels" in inspect.signature(fn).parameters:
            kwargs["in_channels"] = in_channels
    except (TypeError, ValueError):  # builtins without a signature
        pass
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {name}: {attr}(...) returned {type(model).__name__}, not an nn.Module")
    return model
