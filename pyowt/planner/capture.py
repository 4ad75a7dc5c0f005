"""Capture a model for the planner: its layers with the shapes of a global batch, no execution.

Two front ends share one result type, :class:`ModelGraph`:

* chains (AlexNet, VGG, anything :func:`pyowt.parallel.capture_chain` accepts): the steps
  that :func:`pyowt.parallelize` runs, so plans found for them execute; the global shape
  after every step comes from running the traced graph on ``meta`` tensors;
* general DAGs (ResNet: residual adds, BatchNorm): our own ``torch.fx`` capture into nodes
  with their inputs and shapes, used only for predictions (pyowt's runtime executes chains).

Shapes come from an :class:`fx.Interpreter` on meta tensors whose modules run with meta
copies of their parameters (``torch.func.functional_call``), so nothing of the model is
copied or modified and no arithmetic is done.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..parallel.graph import (CONV, FLATTEN, LINEAR, POINTWISE, Step,
                              UnsupportedModelError, _classify_module, _is_flatten_call, capture_chain)

# Node kinds beyond the chain's (see pyowt.parallel.graph): per-channel normalization over the
# batch, and the join of a residual block.
BATCHNORM, ADD = "batchnorm", "add"
Shape = Tuple[int, ...]


@dataclass
class Node:
    """One layer application of a captured model.

    ``inputs``: names of the nodes it reads (empty for the first layer, which reads the
    model's input); ``shape``: its output for the global batch.
    """

    name: str
    kind: str
    module: Optional[nn.Module]
    inputs: List[str]
    shape: Shape
    in_shape: Shape

    @property
    def has_weights(self) -> bool:
        return self.kind in (CONV, LINEAR)

    @property
    def channels(self) -> Tuple[int, int]:
        """(input channels, output channels) of a Conv2d/Linear."""
        m = self.module
        return (m.in_channels, m.out_channels) if self.kind == CONV else (m.in_features, m.out_features)


@dataclass
class ModelGraph:
    """A captured model: ``nodes`` in execution order.

    ``steps`` is set for chains (then plans for this graph run under ``pyowt.parallelize``);
    ``shapes`` maps every node (and step) name to its global output shape.
    """

    nodes: List[Node]
    input_shape: Shape
    steps: Optional[List[Step]] = None
    shapes: Dict[str, Shape] = field(default_factory=dict)

    @property
    def is_chain(self) -> bool:
        return self.steps is not None

    @property
    def weight_nodes(self) -> List[Node]:
        return [n for n in self.nodes if n.has_weights]

    def node(self, name: str) -> Node:
        return self._by_name[name]

    def __post_init__(self):
        self._by_name = {n.name: n for n in self.nodes}


class _MetaShapes(fx.Interpreter):
    """Runs a traced graph on meta tensors; every module sees meta copies of its state."""

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        state = {k: v.to("meta") for k, v in list(mod.named_parameters(recurse=True)) + list(mod.named_buffers(recurse=True))}
        return torch.func.functional_call(mod, state, args, kwargs)

    def get_attr(self, target, args, kwargs):
        v = super().get_attr(target, args, kwargs)
        return v.to("meta") if isinstance(v, torch.Tensor) else v


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds
        raise UnsupportedModelError(f"torch.fx could not trace {type(model).__name__}: {e}") from e


def _node_shapes(gm: fx.GraphModule, input_shape: Shape) -> Dict[fx.Node, Shape]:
    shapes: Dict[fx.Node, Shape] = {}
    interp = _MetaShapes(gm)
    orig = interp.run_node

    def run_node(n):
        out = orig(n)
        if isinstance(out, torch.Tensor):
            shapes[n] = tuple(out.shape)
        return out

    interp.run_node = run_node
    with torch.no_grad():
        interp.run(torch.empty(tuple(input_shape), device="meta"))
    return shapes


def _check_input_shape(input_shape) -> Shape:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be the global batch's shape (B, C, ...), positive, got {tuple(input_shape)}")
    return shape


def _dag_kind(node: fx.Node, modules: Dict[str, nn.Module]) -> Tuple[str, Optional[nn.Module]]:
    if node.op == "call_module":
        mod = modules[node.target]
        if isinstance(mod, nn.BatchNorm2d):
            return BATCHNORM, mod
        step = _classify_module(str(node.target), mod)
        return step.kind, step.module
    if node.op in ("call_function", "call_method"):
        if node.target in (operator.add, operator.iadd, torch.add, "add", "add_"):
            return ADD, None
        if _is_flatten_call(node) or (node.op == "call_method" and node.target in ("view", "reshape")
                                      and len(node.args) == 3 and node.args[2] == -1):
            return FLATTEN, None
        if node.target in (torch.relu, nn.functional.relu, "relu", "relu_"):
            return POINTWISE, nn.ReLU()
    raise UnsupportedModelError(f"node {node.name!r} ({node.op} {node.target}) is not supported by the planner")


def capture(model: nn.Module, input_shape: Sequence[int]) -> ModelGraph:
    """Capture ``model`` for a global batch of ``input_shape`` (B, C, H, W).

    Chains give a graph whose ``steps`` are exactly :func:`capture_chain`'s; other graphs
    (residual networks) are captured node by node for predictions.

    Raises:
        UnsupportedModelError: a node the planner does not know (naming it).
        ValueError: a bad ``input_shape``.
    """
    shape = _check_input_shape(input_shape)
    gm = _trace(model)
    shapes = _node_shapes(gm, shape)
    modules = dict(gm.named_modules())
    try:
        steps = capture_chain(model)
    except UnsupportedModelError:
        steps = None
    nodes: List[Node] = []
    names: Dict[fx.Node, str] = {}
    seen: Dict[str, int] = {}  # uses of each module so far
    placeholder = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if placeholder is not None:
                raise UnsupportedModelError("model must take exactly one input")
            placeholder = n
            continue
        if n.op == "output":
            continue
        kind, mod = _dag_kind(n, modules)
        name = str(n.target) if n.op == "call_module" else n.name
        if name in seen and kind not in (CONV, LINEAR):
            # A module applied more than once (ResNet's one ReLU per block): each use is
            # its own node. Weight layers keep the module's name, which plans key on.
            seen[name] += 1
            name = f"{name}#{seen[name]}"
        seen.setdefault(name, 1)
        names[n] = name
        ins = [a for a in n.all_input_nodes if a is not placeholder]
        in_shape = shapes[n.all_input_nodes[0]] if n.all_input_nodes else shape
        nodes.append(Node(name, kind, mod, [names[a] for a in ins], shapes[n], in_shape))
    if not any(nd.has_weights for nd in nodes):
        raise UnsupportedModelError("model has no Conv2d or Linear layer to parallelize")
    graph = ModelGraph(nodes, shape, steps, {nd.name: nd.shape for nd in nodes})
    return graph


__all__ = ["ADD", "BATCHNORM", "ModelGraph", "Node", "capture"]
