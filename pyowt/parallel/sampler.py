"""Which samples each rank loads in real training.

A parallel model consumes, per step, a global batch of B samples identical on every rank
in meaning, but each rank only needs part of it: its shard when the input is batch-sharded
(data, owt), all of it otherwise (model; its split group's block with a ``split_degree``
below K). Labels follow ``pmodel.label_slice``: the OWT head sees every sample, so every rank
needs all B labels (cheap), while its images are only its shard. Draw the global batch's
indices with a generator seeded the same on every rank, then::

    idx = global_batch_indices(epoch, step)            # (B,), same on every rank
    x = load_images(idx[pmodel.batch_slice(len(idx))])
    y = labels[idx[pmodel.label_slice(len(idx))]]
    loss = pmodel.loss(pmodel(x, global_batch=len(idx)), y)

:func:`epoch_batches` yields such index batches.
"""
from __future__ import annotations

from typing import Iterator

import torch


def epoch_batches(num_samples: int, batch_size: int, epoch: int, seed: int = 0,
                  drop_last: bool = True) -> Iterator[torch.Tensor]:
    """Global batches of sample indices for one epoch, identical on every rank.

    A permutation of ``range(num_samples)`` seeded by (seed, epoch), cut into batches of
    ``batch_size`` (the last, shorter one dropped unless ``drop_last=False``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(num_samples, generator=g)
    stop = num_samples - (num_samples % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        yield perm[start:start + batch_size]


def shard_indices(indices: torch.Tensor, pmodel) -> torch.Tensor:
    """The part of a global batch's ``indices`` whose images this rank loads."""
    return indices[pmodel.batch_slice(len(indices))]
