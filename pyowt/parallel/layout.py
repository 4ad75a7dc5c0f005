"""Layouts of an activation over the K workers of a group (see the table in DESIGN.md).

``Shard(batch)``: each worker holds its slice of the samples (sizes as ``torch.tensor_split``).
``Shard(channel)``: each worker holds its slice of the channels (features, for FC layers).
``Replicate``: every worker holds the whole tensor.
``Partial``: every worker holds a summand of the tensor; layers reduce it before anyone else
sees it, so between layers an activation is always one of the other three.
"""
from enum import Enum


class Layout(str, Enum):
    SHARD_BATCH = "Shard(batch)"
    SHARD_CHANNEL = "Shard(channel)"
    REPLICATE = "Replicate"
    PARTIAL = "Partial"

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.value


# Per-layer parallel configs and the input layout each one consumes.
DATA = "data"            # weights replicated, batch sharded; gradients summed across workers
SPLIT_OUT = "split_out"  # weights split by output channel/feature; input replicated
SPLIT_IN = "split_in"    # weights split by input channel/feature; partial output reduced
CONFIGS = (DATA, SPLIT_OUT, SPLIT_IN)

INPUT_LAYOUT = {DATA: Layout.SHARD_BATCH, SPLIT_OUT: Layout.REPLICATE, SPLIT_IN: Layout.SHARD_CHANNEL}
OUTPUT_LAYOUT = {DATA: Layout.SHARD_BATCH, SPLIT_OUT: Layout.SHARD_CHANNEL, SPLIT_IN: Layout.REPLICATE}


def parse_config(config: str):
    """``(base, degree)`` of a layer config: ``"split_out@2"`` -> ``("split_out", 2)``;
    plain configs have degree ``None`` (the plan's ``split_degree``, else all K).

    A split config may name its own split degree (``@s``: the layer's weights divided over
    groups of s workers, data-parallel across the groups; see :mod:`pyowt.parallel.mesh`).
    """
    if not isinstance(config, str):
        raise TypeError(f"a layer config must be a string, got {type(config).__name__}")
    base, sep, degree = config.partition("@")
    if base not in CONFIGS:
        raise ValueError(f"config {config!r} is not one of {CONFIGS} (split configs may add '@<degree>')")
    if not sep:
        return base, None
    if base == DATA or not degree.isdigit() or int(degree) < 1:
        raise ValueError(f"config {config!r}: only split configs take a degree, as '@<positive int>'")
    return base, int(degree)


def format_config(base: str, degree=None) -> str:
    """The inverse of :func:`parse_config`."""
    return base if degree is None else f"{base}@{degree}"
