"""Checkpoints independent of the number of workers.

:func:`full_state_dict` gathers a parallel model's shards into the plain single-process
``state_dict`` (it loads into the original model); :func:`load_full_state_dict` cuts one into
this rank's shards for any K. The optimizer's state goes the same way, keyed by parameter
name rather than position, so a run saved at K = 2 resumes at K = 3 or K = 1 bit-exactly.
Every rank must call these together (they gather across the group).
"""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

import torch

from .layers import ShardedLayer, reshard, unshard


def _named_shards(pmodel) -> Iterator[Tuple[str, ShardedLayer, str, torch.nn.Parameter]]:
    for layer in pmodel.sharded_layers():
        for which in ("weight", "bias"):
            p = getattr(layer, which)
            if p is not None:
                yield f"{layer.name}.{which}", layer, which, p


def _full_shape(layer: ShardedLayer, which: str) -> tuple:
    return tuple(layer.full_weight_shape) if which == "weight" else (layer.out_channels,)


def full_state_dict(pmodel) -> Dict[str, torch.Tensor]:
    """The unsplit ``state_dict`` of the original model, identical on every rank."""
    return {name: unshard(layer, p, which) for name, layer, which, p in _named_shards(pmodel)}


def load_full_state_dict(pmodel, state_dict: Dict[str, torch.Tensor]) -> None:
    """Load a single-process ``state_dict`` into this rank's shards (strict: every parameter
    must be present with the original shape)."""
    names = {name for name, *_ in _named_shards(pmodel)}
    missing = sorted(names - set(state_dict))
    unexpected = sorted(set(state_dict) - names)
    if missing or unexpected:
        raise ValueError(f"state_dict does not match the model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, layer, which, p in _named_shards(pmodel):
            full = state_dict[name]
            expected = _full_shape(layer, which)
            if tuple(full.shape) != expected:
                raise ValueError(f"state_dict[{name!r}] has shape {tuple(full.shape)}, expected {tuple(expected)}")
            p.copy_(reshard(layer, full.to(p.dtype), which))


def full_optimizer_state_dict(pmodel, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state with every per-parameter tensor unsplit, keyed by parameter name.

    Per-parameter tensors shaped like their parameter (momentum, Adam moments) are gathered;
    other entries (``step`` counts) are copied. ``param_groups`` hold names, not positions.
    """
    by_id = {id(p): (name, layer, which) for name, layer, which, p in _named_shards(pmodel)}
    if any(id(p) not in by_id for p in optimizer.state):
        raise ValueError("optimizer holds a parameter that is not one of the parallel model's")
    state = {}
    # Every rank joins the gathers in the same (model) order.
    for name, layer, which, p in _named_shards(pmodel):
        if p not in optimizer.state:
            continue
        state[name] = {k: (unshard(layer, v, which) if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0 else
                           (v.clone() if torch.is_tensor(v) else v)) for k, v in optimizer.state[p].items()}
    groups = []
    for g in optimizer.param_groups:
        entry = {k: v for k, v in g.items() if k != "params"}
        entry["params"] = [by_id[id(p)][0] for p in g["params"]]
        groups.append(entry)
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_full_optimizer_state_dict(pmodel, optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Load :func:`full_optimizer_state_dict`'s output (from any K) into ``optimizer``."""
    named = {name: (layer, which, p) for name, layer, which, p in _named_shards(pmodel)}
    groups = optimizer.param_groups
    if len(groups) != len(full["param_groups"]):
        raise ValueError(f"optimizer has {len(groups)} param groups, the checkpoint {len(full['param_groups'])}")
    for g, saved in zip(groups, full["param_groups"]):
        names = [n for n, (_, _, p) in named.items() if any(p is q for q in g["params"])]
        if sorted(names) != sorted(saved["params"]):
            raise ValueError(f"param group holds {sorted(names)} but the checkpoint's holds {sorted(saved['params'])}")
        for k, v in saved.items():
            if k != "params":
                g[k] = v
    optimizer.state.clear()
    for name, s in full["state"].items():
        if name not in named:
            raise ValueError(f"checkpoint has optimizer state for unknown parameter {name!r}")
        layer, which, p = named[name]
        full_shape = _full_shape(layer, which)
        optimizer.state[p] = {k: (reshard(layer, v, which).to(p.device) if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) == full_shape else
                                  (v.clone() if torch.is_tensor(v) else v)) for k, v in s.items()}
