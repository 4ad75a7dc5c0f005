"""Capture a model as a chain of steps with ``torch.fx``.

The strategies rewrite models layer by layer, so they need the order in which a model applies
its layers: convolutions, linears, and the layers in between (activations, pooling, dropout,
normalization across channels, flatten). A model whose graph is not a chain, or that uses a
layer the strategies cannot place, is refused with an error naming the node.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.fx as fx
from torch import nn

# Kinds of step and what they need of their input's layout.
CONV, LINEAR = "conv", "linear"
POINTWISE = "pointwise"      # per element or per channel: runs on any non-partial layout
CROSS_CHANNEL = "cross_channel"  # mixes channels (LRN): needs all channels
FLATTEN = "flatten"          # (N, C, H, W) -> (N, C*H*W): needs all channels
DROPOUT = "dropout"

_POINTWISE_MODULES = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity)


class UnsupportedModelError(ValueError):
    """The model cannot be captured as a chain the strategies understand."""


@dataclass
class Step:
    """One layer application: ``name`` is the module's qualified name (or the fx node's)."""

    name: str
    kind: str
    module: Optional[nn.Module] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)

    @property
    def has_weights(self) -> bool:
        return self.kind in (CONV, LINEAR)


def _classify_module(name: str, mod: nn.Module) -> Step:
    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros":
            raise UnsupportedModelError(f"layer {name!r}: Conv2d padding_mode={mod.padding_mode!r} is not supported (only 'zeros')")
        if mod.groups != 1:
            raise UnsupportedModelError(f"layer {name!r}: Conv2d groups={mod.groups} is not supported by the strategies (only 1)")
        if isinstance(mod.padding, str):
            raise UnsupportedModelError(f"layer {name!r}: Conv2d padding={mod.padding!r} is not supported; use integers")
        return Step(name, CONV, mod)
    if isinstance(mod, nn.Linear):
        return Step(name, LINEAR, mod)
    if isinstance(mod, nn.Dropout):
        return Step(name, DROPOUT, mod)
    if isinstance(mod, nn.LocalResponseNorm):
        return Step(name, CROSS_CHANNEL, mod)
    if isinstance(mod, nn.Flatten):
        if mod.start_dim != 1 or mod.end_dim != -1:
            raise UnsupportedModelError(f"layer {name!r}: Flatten(start_dim={mod.start_dim}, end_dim={mod.end_dim}) is not supported; only Flatten(1)")
        return Step(name, FLATTEN, mod)
    if isinstance(mod, _POINTWISE_MODULES):
        return Step(name, POINTWISE, mod)
    raise UnsupportedModelError(
        f"layer {name!r} of type {type(mod).__name__} is not supported by the parallel strategies; "
        "supported: Conv2d, Linear, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, LocalResponseNorm, Dropout, Flatten"
    )


def _is_flatten_call(node: fx.Node) -> bool:
    if node.target not in (torch.flatten, "flatten"):
        return False
    args = list(node.args[1:]) + list(node.kwargs.values())
    start = args[0] if args else 0
    end = args[1] if len(args) > 1 else -1
    return start == 1 and end == -1


def capture_chain(model: nn.Module) -> List[Step]:
    """Trace ``model`` and return its layers in application order.

    Raises :class:`UnsupportedModelError` naming the node when the graph branches, has more
    than one input, or uses an op other than the supported layers, ``torch.flatten(x, 1)``
    and ``x.view/reshape(x.size(0), -1)``.
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds
        raise UnsupportedModelError(f"torch.fx could not trace {type(model).__name__}: {e}") from e
    modules = dict(gm.named_modules())
    steps: List[Step] = []
    prev: Optional[fx.Node] = None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(f"model must take exactly one input, its graph has {len(placeholders)}")
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            prev = node
            continue
        if node.op == "output":
            if node.args[0] is not prev:
                raise UnsupportedModelError("model output is not the last layer's result (the graph is not a chain)")
            break
        inputs = [a for a in node.all_input_nodes]
        if len(inputs) != 1 or inputs[0] is not prev or len(prev.users) != 1:
            raise UnsupportedModelError(f"node {node.name!r} ({node.op} {node.target}) makes the graph branch; "
                                        "only chains of layers are supported")
        if node.op == "call_module":
            steps.append(_classify_module(str(node.target), modules[node.target]))
        elif node.op in ("call_function", "call_method") and _is_flatten_call(node):
            steps.append(Step(node.name, FLATTEN))
        elif node.op == "call_method" and node.target in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1:
            steps.append(Step(node.name, FLATTEN))
        elif node.op == "call_function" and node.target in (torch.relu, nn.functional.relu):
            steps.append(Step(node.name, POINTWISE, nn.ReLU()))
        elif node.op == "call_function" and node.target is operator.getitem:
            raise UnsupportedModelError(f"node {node.name!r}: indexing is not supported")
        else:
            raise UnsupportedModelError(f"node {node.name!r} ({node.op} {node.target}) is not supported by the parallel strategies")
        prev = node
    if not any(s.has_weights for s in steps):
        raise UnsupportedModelError("model has no Conv2d or Linear layer to parallelize")
    return steps
