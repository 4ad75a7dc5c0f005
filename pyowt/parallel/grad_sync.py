"""Summing the gradients of replicated (``data``) parameters across workers, overlapped with
the backward pass.

Parameters are grouped into buckets in the order their gradients become ready (reverse of
the forward). A bucket's all-reduce starts as soon as its last gradient is accumulated, while
autograd keeps computing earlier layers; the end of the backward waits for all of them and
copies the sums back. Gradients are *summed*, not averaged: pyowt's loss is the mean over the
global batch, so each worker's gradient is already its share of the global gradient.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
from torch import nn

from .. import distributed as pdist


def bucket_indices(nbytes: List[int], bucket_bytes: int) -> List[List[int]]:
    """Group parameters (given in forward order by their sizes in bytes) into buckets in
    backward order: a bucket closes once it holds at least ``bucket_bytes``."""
    buckets, current, size = [], [], 0
    for i in reversed(range(len(nbytes))):
        current.append(i)
        size += nbytes[i]
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


class _Bucket:
    """A persistent flat buffer; after a sync, each parameter's ``.grad`` is a view of it."""

    def __init__(self, params: List[nn.Parameter]):
        self.params = params
        self.ready = 0
        self.work = None
        self.launched = False
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self.slots = {}
        offset = 0
        for p in params:
            self.slots[id(p)] = self.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()


class GradSync:
    """Bucketed, overlapped all-reduce (sum) of ``params``' gradients after each backward.

    Each bucket owns a flat buffer. As a gradient is accumulated it is copied into its slot
    (unless it already is the slot); a full bucket is summed in place, asynchronously, while
    autograd goes on; at the end of the backward every parameter's ``.grad`` becomes a view
    of its summed slot, so the next step's gradients accumulate there without copies (as
    DDP's ``gradient_as_bucket_view``). ``zero_grad(set_to_none=True)`` works too: the
    next gradient is copied in once.

    Args:
        params: the replicated parameters, in forward order (one dtype and device per bucket).
        group: the process group.
        bucket_bytes: target bucket size (the last bucket may be smaller).
    """

    def __init__(self, params: List[nn.Parameter], group, bucket_bytes: int = 25 * 2**20):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.group = group
        self.enabled = True
        self.buckets: List[_Bucket] = []
        self._bucket_of: Dict[int, _Bucket] = {}
        self._queued = False
        params = [p for p in params if p.requires_grad]
        for idx in bucket_indices([p.numel() * p.element_size() for p in params], bucket_bytes):
            group_params = [params[i] for i in idx]
            # A bucket's buffer has one dtype and device: split mixed runs.
            runs, current = [], [group_params[0]]
            for p in group_params[1:]:
                if p.dtype == current[0].dtype and p.device == current[0].device:
                    current.append(p)
                else:
                    runs.append(current)
                    current = [p]
            runs.append(current)
            self.buckets += [_Bucket(run) for run in runs]
        self._handles = []
        for b in self.buckets:
            for p in b.params:
                self._bucket_of[id(p)] = b
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (e.g. over micro-batches); the next backward outside
        the context sums everything accumulated so far."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self.enabled:
            return
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        bucket = self._bucket_of[id(p)]
        slot = bucket.slots[id(p)]
        if p.grad.data_ptr() != slot.data_ptr():
            slot.copy_(p.grad)
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        for p in bucket.params:  # parameters that got no gradient this time contribute zeros
            if p.grad is None:
                bucket.slots[id(p)].zero_()
        bucket.work = pdist.all_reduce_inplace(bucket.flat, group=self.group, async_op=True)
        bucket.launched = True

    def _finish(self) -> None:
        self._queued = False
        for bucket in self.buckets:
            if bucket.ready and not bucket.launched:  # some parameters got no gradient
                self._launch(bucket)
        for bucket in self.buckets:
            if not bucket.launched:
                continue
            if bucket.work is not None:
                bucket.work.wait()
            for p in bucket.params:
                p.grad = bucket.slots[id(p)]
            bucket.work, bucket.launched, bucket.ready = None, False, 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
