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

Split degrees (:mod:`pyowt.parallel.mesh`): every non-``Shard(batch)`` layout lives in the
split groups of one degree s, and each op carries the degree whose groups it runs in
(``None``: all K). When a split layer's degree differs from the current layout's, the
activation goes back to ``Shard(batch)`` (a local split, after gathering its channels if
they were sharded) and on from there in the new groups: every hop is an ordinary
transition with its own dual, so gradients stay exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from torch import nn

from .graph import CONV, CROSS_CHANNEL, DROPOUT, FLATTEN, POINTWISE, Step
from .layout import DATA, INPUT_LAYOUT, OUTPUT_LAYOUT, SPLIT_IN, SPLIT_OUT, Layout, parse_config
from .mesh import check_split_degree
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
    all-gather's sizes follow: ``"batch"`` (the global batch) or ``"channels"``. ``degree``:
    the split degree whose groups the op runs in (layers: their own; transitions: the
    layout's), ``None`` for all K; data layers and ``Shard(batch)`` ignore it.
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
    degree: Optional[int] = None


@dataclass
class Program:
    ops: List[Op]
    input_layout: Layout
    output_layout: Layout
    input_degree: Optional[int] = None   # of the input layout (None: all K, or Shard(batch))
    output_degree: Optional[int] = None  # of the output layout


def _out_channels(step: Step) -> int:
    m = step.module
    return m.out_channels if step.kind == CONV else m.out_features


class _Compiler:
    def __init__(self, plan: Plan, k: Optional[int]):
        self.plan, self.k = plan, k
        if k is not None:  # every degree the plan names must divide K
            check_split_degree(plan.split_degree, k)
            for name, cfg in plan.layers.items():
                degree = parse_config(cfg)[1]
                if degree is not None:
                    try:
                        check_split_degree(degree, k)
                    except ValueError as e:
                        raise ValueError(f"plan {plan.name!r} entry {name!r} ({cfg!r}): {e}") from None
        self.ops: List[Op] = []
        self.layout: Optional[Layout] = None
        self.degree: Optional[int] = None  # of the current layout (unless Shard(batch))
        self.channels: Optional[int] = None
        self.partial_grad_ok = True  # does the Replicate activation's producer sum a Partial grad?

    def config(self, name: str):
        """(base config, resolved degree) of a weight layer: its own ``@s``, else the plan's
        ``split_degree``; a degree equal to K (when K is known) is written ``None``."""
        base, degree = parse_config(self.plan.layers[name])
        if base == DATA:
            return base, None
        degree = degree if degree is not None else self.plan.split_degree
        return base, (None if degree == self.k else degree)

    def to_layout(self, want: Layout, consumer: Optional[str] = None, degree: Optional[int] = None) -> None:
        have = self.layout
        if have != Layout.SHARD_BATCH and want != Layout.SHARD_BATCH and self.degree != degree:
            # Another split degree: back to Shard(batch) inside the current groups first.
            if have == Layout.SHARD_CHANNEL:
                self.ops.append(Op(ALL_GATHER, dim=1, grad="split", gather_of="channels", channels=self.channels,
                                   degree=self.degree))
            self.ops.append(Op(SPLIT, dim=0, degree=self.degree))
            have = self.layout = Layout.SHARD_BATCH
        if want != Layout.SHARD_BATCH and have == Layout.SHARD_BATCH:
            self.degree = degree
        d = self.degree
        partial_consumer = consumer == SPLIT_OUT
        if have == want:
            if want == Layout.REPLICATE and partial_consumer and not self.partial_grad_ok:
                self.ops.append(Op(COPY_TO_GROUP, degree=d))
            return
        gather_grad = "reduce_scatter" if (want == Layout.REPLICATE and partial_consumer) else "split"
        if have == Layout.SHARD_CHANNEL:
            self.ops.append(Op(ALL_GATHER, dim=1, grad=gather_grad, gather_of="channels", channels=self.channels,
                               degree=d))
            have = Layout.REPLICATE
        elif have == Layout.SHARD_BATCH:
            self.ops.append(Op(ALL_GATHER, dim=0, grad=gather_grad, gather_of="batch", degree=d))
            have = Layout.REPLICATE
        if have != want:  # from Replicate
            self.ops.append(Op(SPLIT, dim=0 if want == Layout.SHARD_BATCH else 1, degree=d))
        self.layout = want
        self.partial_grad_ok = gather_grad == "reduce_scatter"

    def compile(self, steps: List[Step]) -> Program:
        # The gradient reaching a point of the chain is Partial iff the next weight layer
        # is split_out: every layer between (pointwise, dropout, LRN, flatten) has a backward
        # linear in its gradient, so a Partial gradient stays Partial through it.
        # A degree change between goes through Shard(batch), whose transitions hand back an
        # exact gradient: the gradient is then Partial only if the degrees match.
        next_cfg: List[Optional[tuple]] = [None] * (len(steps) + 1)
        for i in reversed(range(len(steps))):
            next_cfg[i] = self.config(steps[i].name) if steps[i].has_weights else next_cfg[i + 1]
        first_cfg, first_degree = next(self.config(s.name) for s in steps if s.has_weights)
        input_layout = Layout.SHARD_BATCH if INPUT_LAYOUT[first_cfg] == Layout.SHARD_BATCH else Layout.REPLICATE
        self.layout = input_layout
        self.degree = first_degree if input_layout != Layout.SHARD_BATCH else None
        input_degree = self.degree
        skip = set()
        for i, s in enumerate(steps):
            if i in skip:
                continue
            if s.has_weights:
                cfg, degree = self.config(s.name)
                self.to_layout(INPUT_LAYOUT[cfg], consumer=cfg, degree=degree)
                nxt = steps[i + 1] if i + 1 < len(steps) else None
                act = None
                if nxt is not None and nxt.kind == POINTWISE and isinstance(nxt.module, nn.ReLU):
                    act = "relu"
                    skip.add(i + 1)
                self.ops.append(Op(LAYER, step=s, config=cfg, activation=act, degree=degree))
                self.layout = OUTPUT_LAYOUT[cfg]
                self.degree = degree if self.layout != Layout.SHARD_BATCH else None
                self.partial_grad_ok = cfg != SPLIT_IN
                self.channels = _out_channels(s)
            elif s.kind == POINTWISE:
                self.ops.append(Op(MODULE, step=s))
            elif s.kind == DROPOUT:
                self.ops.append(Op(DROP, step=s, layout=self.layout, channels=self.channels, degree=self.degree))
            elif s.kind in (CROSS_CHANNEL, FLATTEN):
                if self.layout == Layout.SHARD_CHANNEL:
                    nxt_cfg, nxt_degree = next_cfg[i] if next_cfg[i] is not None else (None, None)
                    self.to_layout(Layout.REPLICATE, consumer=nxt_cfg if nxt_degree == self.degree else None,
                                   degree=self.degree)
                self.ops.append(Op(MODULE, step=s))
            else:  # pragma: no cover - capture_chain yields only the kinds above
                raise AssertionError(s.kind)
        return Program(self.ops, input_layout, self.layout, input_degree,
                       self.degree if self.layout != Layout.SHARD_BATCH else None)


def compile_plan(plan: Plan, steps: List[Step], k: Optional[int] = None) -> Program:
    """The program that runs ``steps`` (from :func:`capture_chain`) under ``plan`` on ``k``
    workers (``k`` lets a degree equal to K mean "all", and every degree is checked to
    divide it; without it only the plan's own degrees are compared)."""
    return _Compiler(plan, k).compile(steps)
