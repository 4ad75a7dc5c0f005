"""Compiling a plan into a program: the layers and transitions one step runs, in order.

The program is plain data, independent of any process group, so the same compilation drives
both :func:`pyowt.parallelize` (which instantiates it on a group) and the communication
model (:mod:`pyowt.parallel.comm_model`, which costs it for any K without processes). That
keeps one place that decides where an activation changes layout.

Rules (see DESIGN.md, "Layouts"): a weight layer needs its config's input layout; a
pointwise layer or dropout runs on any layout; a cross-channel layer (LRN) or flatten needs
all channels. A Replicate activation feeding a ``split_out`` layer receives a Partial
gradient, so its producer must sum: an all-gather then uses a reduce-scatter backward, and
an all-reduced activation (a ``split_in`` layer's output) passes through ``copy_to_group``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from torch import nn

from .graph import CONV, CROSS_CHANNEL, DROPOUT, FLATTEN, POINTWISE, Step
from .layout import INPUT_LAYOUT, OUTPUT_LAYOUT, SPLIT_IN, SPLIT_OUT, Layout
from .plan import Plan

# Op kinds of a program.
LAYER, MODULE, DROP = "layer", "module", "dropout"
ALL_GATHER, SPLIT, COPY_TO_GROUP = "all_gather", "split", "copy_to_group"


@dataclass
class Op:
    """One entry of a program.

    ``kind`` is LAYER (a Conv2d/Linear under ``config``, with ``activation`` fused), MODULE
    (a parameter-free layer run as is), DROP (split-invariant dropout on an activation of
    ``layout`` with ``channels`` channels), or a transition: ALL_GATHER along ``dim`` with
    backward ``grad``, SPLIT along ``dim``, COPY_TO_GROUP. ``gather_of`` says what an
    all-gather's sizes follow: ``"batch"`` (the global batch) or ``"channels"``.
    """

    kind: str
    step: Optional[Step] = None
    config: Optional[str] = None
    activation: Optional[str] = None
    layout: Optional[Layout] = None
    channels: Optional[int] = None
    dim: Optional[int] = None
    grad: Optional[str] = None
    gather_of: Optional[str] = None


@dataclass
class Program:
    ops: List[Op]
    input_layout: Layout
    output_layout: Layout


def _out_channels(step: Step) -> int:
    m = step.module
    return m.out_channels if step.kind == CONV else m.out_features


class _Compiler:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.ops: List[Op] = []
        self.layout: Optional[Layout] = None
        self.channels: Optional[int] = None
        self.partial_grad_ok = True  # does the Replicate activation's producer sum a Partial grad?

    def to_layout(self, want: Layout, consumer: Optional[str] = None) -> None:
        have = self.layout
        partial_consumer = consumer == SPLIT_OUT
        if have == want:
            if want == Layout.REPLICATE and partial_consumer and not self.partial_grad_ok:
                self.ops.append(Op(COPY_TO_GROUP))
            return
        gather_grad = "reduce_scatter" if (want == Layout.REPLICATE and partial_consumer) else "split"
        if have == Layout.SHARD_CHANNEL:
            self.ops.append(Op(ALL_GATHER, dim=1, grad=gather_grad, gather_of="channels", channels=self.channels))
            have = Layout.REPLICATE
        elif have == Layout.SHARD_BATCH:
            self.ops.append(Op(ALL_GATHER, dim=0, grad=gather_grad, gather_of="batch"))
            have = Layout.REPLICATE
        if have != want:  # from Replicate
            self.ops.append(Op(SPLIT, dim=0 if want == Layout.SHARD_BATCH else 1))
        self.layout = want
        self.partial_grad_ok = gather_grad == "reduce_scatter"

    def compile(self, steps: List[Step]) -> Program:
        # The gradient reaching a point of the chain is Partial iff the next weight layer
        # is split_out: every layer between (pointwise, dropout, LRN, flatten) has a backward
        # linear in its gradient, so a Partial gradient stays Partial through it.
        next_cfg: List[Optional[str]] = [None] * (len(steps) + 1)
        for i in reversed(range(len(steps))):
            next_cfg[i] = self.plan.layers[steps[i].name] if steps[i].has_weights else next_cfg[i + 1]
        first_cfg = next(self.plan.layers[s.name] for s in steps if s.has_weights)
        input_layout = Layout.SHARD_BATCH if INPUT_LAYOUT[first_cfg] == Layout.SHARD_BATCH else Layout.REPLICATE
        self.layout = input_layout
        skip = set()
        for i, s in enumerate(steps):
            if i in skip:
                continue
            if s.has_weights:
                cfg = self.plan.layers[s.name]
                self.to_layout(INPUT_LAYOUT[cfg], consumer=cfg)
                nxt = steps[i + 1] if i + 1 < len(steps) else None
                act = None
                if nxt is not None and nxt.kind == POINTWISE and isinstance(nxt.module, nn.ReLU):
                    act = "relu"
                    skip.add(i + 1)
                self.ops.append(Op(LAYER, step=s, config=cfg, activation=act))
                self.layout = OUTPUT_LAYOUT[cfg]
                self.partial_grad_ok = cfg != SPLIT_IN
                self.channels = _out_channels(s)
            elif s.kind == POINTWISE:
                self.ops.append(Op(MODULE, step=s))
            elif s.kind == DROPOUT:
                self.ops.append(Op(DROP, step=s, layout=self.layout, channels=self.channels))
            elif s.kind in (CROSS_CHANNEL, FLATTEN):
                if self.layout == Layout.SHARD_CHANNEL:
                    self.to_layout(Layout.REPLICATE, consumer=next_cfg[i])
                self.ops.append(Op(MODULE, step=s))
            else:  # pragma: no cover - capture_chain yields only the kinds above
                raise AssertionError(s.kind)
        return Program(self.ops, input_layout, self.layout)


def compile_plan(plan: Plan, steps: List[Step]) -> Program:
    """The program that runs ``steps`` (from :func:`capture_chain`) under ``plan``."""
    return _Compiler(plan).compile(steps)
