"""Plans: a parallel config per weight layer, plus how activations enter the split head.

A :class:`Plan` maps each Conv2d/Linear layer's qualified name to ``"data"``,
``"split_out"`` or ``"split_in"`` (see :mod:`pyowt.parallel.layout`). The strategies of the
OWT paper are presets:

* ``"data"``: every layer ``data``;
* ``"model"``: every layer split, alternating ``split_out`` / ``split_in`` (convs by channel,
  FCs column then row), the full batch on every worker;
* ``"owt"``: the conv trunk ``data``, the FC head split (column, row, column, ...), with
  ``scheme`` a/b/c for moving the trunk's batch-sharded activations into the head and
  ``fc_update`` accumulate/per_pass.

``split_degree`` s makes any of them a hybrid: the split layers divide their weights over s
workers and run data-parallel over the K / s groups of s (see :mod:`pyowt.parallel.mesh`);
``None`` (the default) splits over all K.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from torch import nn

from .graph import CONV, LINEAR, capture_chain
from .layout import DATA, SPLIT_IN, SPLIT_OUT, parse_config

PRESETS = ("data", "model", "owt")
SCHEMES = ("a", "b", "c")
FC_UPDATES = ("accumulate", "per_pass")


@dataclass
class Plan:
    """A parallel config per weight layer.

    Attributes:
        layers: qualified module name -> ``"data" | "split_out" | "split_in"``, for every
            Conv2d and Linear of the model; a split config may carry its own split degree,
            ``"split_out@2"`` (see :func:`~pyowt.parallel.layout.parse_config`).
        scheme: how a batch-sharded activation enters a split region (OWT's a, b or c).
        fc_update: ``"accumulate"`` (one step per global batch) or ``"per_pass"`` (schemes
            b and c: the split head steps after every pass).
        name: a label for tables (``"data"``, ``"owt(a)"``, ...).
        split_degree: workers a split layer's weights are divided over (must divide K),
            for split configs without their own ``@degree``; ``None``: all K. Schemes b
            and c need every split layer at degree K.
    """

    layers: Dict[str, str]
    scheme: str = "a"
    fc_update: str = "accumulate"
    name: str = "custom"
    version: int = field(default=1)
    split_degree: Optional[int] = None

    def __post_init__(self):
        for name, cfg in self.layers.items():
            try:
                parse_config(cfg)
            except (TypeError, ValueError) as e:
                raise ValueError(f"plan entry {name!r}: {e}") from None
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.fc_update not in FC_UPDATES:
            raise ValueError(f"fc_update must be one of {FC_UPDATES}, got {self.fc_update!r}")
        if self.fc_update == "per_pass" and self.scheme == "a":
            raise ValueError("fc_update='per_pass' needs scheme 'b' or 'c' (scheme 'a' runs the head once)")
        if self.split_degree is not None and (isinstance(self.split_degree, bool) or not isinstance(self.split_degree, int)
                                              or self.split_degree < 1):
            raise ValueError(f"split_degree must be a positive int or None, got {self.split_degree!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ValueError(f"plan is not valid JSON: {e}") from e
        if not isinstance(d, dict) or not isinstance(d.get("layers"), dict):
            raise ValueError("plan JSON must be an object with a 'layers' object")
        known = {"layers", "scheme", "fc_update", "name", "version", "split_degree"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"plan JSON has unknown keys {sorted(unknown)}; expected {sorted(known)}")
        return cls(**d)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str) -> "Plan":
        with open(path) as f:
            return cls.from_json(f.read())

    def fingerprint(self) -> str:
        """A short hash of the plan, equal on every rank that holds the same plan."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def _alternate(names: List[str]) -> Dict[str, str]:
    return {n: (SPLIT_OUT if i % 2 == 0 else SPLIT_IN) for i, n in enumerate(names)}


def make_plan(model: nn.Module, preset: str, scheme: str = "a", fc_update: str = "accumulate",
              split_degree: Optional[int] = None) -> Plan:
    """The plan of a preset strategy for ``model``.

    Args:
        model: the model to parallelize (captured with :func:`capture_chain`).
        preset: ``"data"``, ``"model"`` or ``"owt"``.
        scheme, fc_update: OWT options (ignored by ``data`` and ``model``).
        split_degree: split the split layers over this many workers, data-parallel across
            the K / split_degree groups (``model`` and ``owt``; ``None``: all K).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    steps = capture_chain(model)
    convs = [s.name for s in steps if s.kind == CONV]
    linears = [s.name for s in steps if s.kind == LINEAR]
    suffix = "" if split_degree is None else f" split {split_degree}"
    if preset == "data":
        layers = {n: DATA for n in convs + linears}
        return Plan(layers, name="data")
    if preset == "model":
        layers = {**_alternate(convs), **_alternate(linears)}
        return Plan(layers, name="model" + suffix, split_degree=split_degree)
    if not linears:
        raise ValueError("preset 'owt' needs at least one Linear layer for the model-parallel head")
    layers = {**{n: DATA for n in convs}, **_alternate(linears)}
    label = f"owt({scheme}{'' if fc_update == 'accumulate' else ', per_pass'}){suffix}"
    return Plan(layers, scheme=scheme, fc_update=fc_update, name=label, split_degree=split_degree)


def resolve_plan(model: nn.Module, plan, **options) -> Plan:
    """A :class:`Plan` from a Plan, a preset name, a path to a plan JSON file, or a dict."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return Plan(**plan)
    if isinstance(plan, str):
        if plan in PRESETS:
            return make_plan(model, plan, **options)
        if plan.endswith(".json"):
            return Plan.load(plan)
        raise ValueError(f"plan must be a Plan, one of {PRESETS}, or a .json path, got {plan!r}")
    raise TypeError(f"plan must be a Plan, str or dict, got {type(plan).__name__}")


def validate_plan(plan: Plan, model: nn.Module) -> None:
    """Every Conv2d/Linear of ``model`` has an entry and every entry names one of them."""
    steps = capture_chain(model)
    weight_layers = [s.name for s in steps if s.has_weights]
    missing = [n for n in weight_layers if n not in plan.layers]
    extra = [n for n in plan.layers if n not in weight_layers]
    if missing:
        raise ValueError(f"plan {plan.name!r} has no entry for layer {missing[0]!r} (layers: {weight_layers})")
    if extra:
        raise ValueError(f"plan {plan.name!r} entry {extra[0]!r} is not a Conv2d/Linear of the model (layers: {weight_layers})")
