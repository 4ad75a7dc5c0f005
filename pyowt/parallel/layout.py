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
