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
    def __init__(self, params: List[nn.Parameter]):
        self.params = params
        self.ready = 0
        self.flat = None
        self.pending = None


class GradSync:
    """Bucketed, overlapped all-reduce (sum) of ``params``' gradients after each backward.

    Args:
        params: the replicated parameters, in forward order.
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
            self.buckets.append(_Bucket([params[i] for i in idx]))
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
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        bucket.flat = torch.cat([g.reshape(-1) for g in grads])
        bucket.pending = pdist.all_reduce_async(bucket.flat, group=self.group)

    def _finish(self) -> None:
        self._queued = False
        for bucket in self.buckets:
            if bucket.ready == 0:
                continue  # no gradient reached this bucket in this backward
            if bucket.pending is None:  # some parameters got no gradient: still sum the rest
                self._launch(bucket)
        for bucket in self.buckets:
            if bucket.pending is None:
                continue
            summed = bucket.pending.wait()
            offset = 0
            for p in bucket.params:
                n = p.numel()
                piece = summed[offset:offset + n].view_as(p)
                if p.grad is None:
                    p.grad = piece.clone()
                else:
                    p.grad.copy_(piece)
                offset += n
            bucket.flat, bucket.pending, bucket.ready = None, None, 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
