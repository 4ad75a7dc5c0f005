"""Strategies as plans: layouts, per-layer configs, presets, parallelize, checkpoints."""
from .checkpoint import (full_optimizer_state_dict, full_state_dict, load_full_optimizer_state_dict,
                         load_full_state_dict)
from .dropout import SeededDropout, seeded_dropout_copy
from .graph import UnsupportedModelError, capture_chain
from .layout import CONFIGS, Layout
from .parallelize import ParallelModel, parallelize
from .plan import PRESETS, Plan, make_plan

__all__ = [
    "CONFIGS", "Layout", "PRESETS", "ParallelModel", "Plan", "SeededDropout", "UnsupportedModelError",
    "capture_chain", "full_optimizer_state_dict", "full_state_dict", "load_full_optimizer_state_dict",
    "load_full_state_dict", "make_plan", "parallelize", "seeded_dropout_copy",
]
