"""What each rank feeds per step: its shard of every global batch, and the labels it needs.

Every rank draws the same global batches of indices (:func:`pyowt.parallel.sampler.epoch_batches`,
seeded by (seed, epoch)), then loads only the rows ``pmodel.batch_slice(B)`` when the input is
batch-sharded (data, owt) or all of them (model; its split group's batch block under a plan
with a ``split_degree`` below K). Labels are cheap, so they come from an in-memory tensor, for
the rows ``pmodel.label_slice(B)``: all B samples when the OWT head sees every sample, the
rank's rows otherwise.

Sources: ``digits`` and ``synthetic`` live in memory (on the GPU when there is one: no
loading at all); an ImageFolder goes through a ``DataLoader`` with worker processes, pinned
memory on GPUs and persistent workers, whose batch sampler yields this rank's rows of each
global batch. The position in an epoch is just the number of global batches already done, so
resuming skips them without loading them.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import torch

from ..parallel.sampler import epoch_batches
from .errors import UserError
from .imagefolder import ImageFolderData, ScanReport, collate, scan_image_folder

# A global batch as one rank sees it: (its inputs, the labels it needs, B, images that failed to decode).
Batch = Tuple[torch.Tensor, torch.Tensor, int, int]


def _labels(targets: torch.Tensor, idx: torch.Tensor, pmodel) -> torch.Tensor:
    return targets[idx[pmodel.label_slice(len(idx))]]


def _rows(idx: torch.Tensor, pmodel) -> torch.Tensor:
    return idx[pmodel.batch_slice(len(idx))]


def val_index_batches(n: int, batch_size: int, k: int) -> List[torch.Tensor]:
    """Consecutive batches over ``range(n)``; a last batch smaller than ``k`` joins the one before
    (every rank must get at least one row)."""
    cuts = list(range(0, n, batch_size)) + [n]
    if len(cuts) > 2 and cuts[-1] - cuts[-2] < k:
        del cuts[-2]
    return [torch.arange(a, b) for a, b in zip(cuts[:-1], cuts[1:])]


@dataclass
class DataSource:
    """Training and validation data with the facts the model needs (classes, channels)."""

    name: str
    num_classes: int
    in_channels: int
    train_size: int
    val_size: int
    classes: List[str] = field(default_factory=list)
    report: Optional[ScanReport] = None
    val_report: Optional[ScanReport] = None

    def train_batches(self, pmodel, batch_size: int, epoch: int, start: int, seed: int) -> Iterator[Batch]:
        raise NotImplementedError

    def val_batches(self, pmodel, batch_size: int) -> Iterator[Batch]:
        raise NotImplementedError

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.train_size // batch_size

    def close(self) -> None:
        pass


class TensorSource(DataSource):
    """Images already in memory (digits, synthetic); moved to the device once when they fit."""

    def __init__(self, name, train, val, num_classes, device, classes=None):
        xt, yt = train.tensors
        xv, yv = val.tensors
        super().__init__(name, num_classes, xt.shape[1], len(yt), len(yv), list(classes or []))
        fits = (xt.numel() + xv.numel()) * xt.element_size() < 2**30
        self.device = device
        where = device if (device.type == "cuda" and fits) else torch.device("cpu")
        self.xt, self.yt, self.xv, self.yv = xt.to(where), yt.to(where), xv.to(where), yv.to(where)

    def _batch(self, x, y, idx, pmodel) -> Batch:
        on = x.device
        xl = x[_rows(idx, pmodel).to(on)].to(self.device, non_blocking=True)
        return xl, _labels(y, idx.to(on), pmodel).to(self.device, non_blocking=True), len(idx), 0

    def train_batches(self, pmodel, batch_size, epoch, start, seed):
        for i, idx in enumerate(epoch_batches(self.train_size, batch_size, epoch, seed)):
            if i >= start:
                yield self._batch(self.xt, self.yt, idx, pmodel)

    def val_batches(self, pmodel, batch_size):
        for idx in val_index_batches(self.val_size, batch_size, pmodel.k):
            yield self._batch(self.xv, self.yv, idx, pmodel)


class _RankBatches:
    """Batch sampler: this rank's (index, epoch) keys of each global batch set by the loop."""

    def __init__(self):
        self.batches: List[torch.Tensor] = []
        self.epoch = 0
        self.pmodel = None

    def __iter__(self):
        for idx in self.batches:
            yield [(int(i), self.epoch) for i in _rows(idx, self.pmodel)]

    def __len__(self):
        return len(self.batches)


def _ignore_sigint(worker_id: int) -> None:
    # A terminal's Ctrl-C reaches the loader processes too. The trainer decides what it means
    # (finish the step, checkpoint: pyowt.train.interrupt); a loader that died of it would fail
    # the batches still to come, and a forked one would run the trainer's handler. They still
    # exit with the trainer (DataLoader's workers watch their parent).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class FolderSource(DataSource):
    """An ImageFolder tree; see :mod:`pyowt.train.imagefolder` for the safety checks."""

    def __init__(self, name, train: ScanReport, val: ScanReport, size, channels, device, seed,
                 loader_workers, augment, limits):
        super().__init__(name, len(train.classes), channels, len(train.samples), len(val.samples),
                         list(train.classes), train, val)
        self.device = device
        self.train_data = ImageFolderData(train.samples, size, channels, augment, seed, *limits)
        self.val_data = ImageFolderData(val.samples, size, channels, False, seed, *limits)
        pin = device.type == "cuda"
        opts = dict(num_workers=loader_workers, pin_memory=pin, collate_fn=collate,
                    worker_init_fn=_ignore_sigint)
        if loader_workers > 0:
            # Persistent workers: no re-spawn every epoch; prefetching keeps the step fed.
            opts.update(persistent_workers=True, prefetch_factor=4)
        self.train_sampler, self.val_sampler = _RankBatches(), _RankBatches()
        self.train_loader = torch.utils.data.DataLoader(self.train_data, batch_sampler=self.train_sampler, **opts)
        self.val_loader = torch.utils.data.DataLoader(self.val_data, batch_sampler=self.val_sampler, **opts)

    def _run(self, loader, sampler, data, batches, epoch, pmodel):
        sampler.batches, sampler.epoch, sampler.pmodel = batches, epoch, pmodel
        for idx, (x, bad) in zip(batches, loader):
            yield (x.to(self.device, non_blocking=True), _labels(data.targets, idx, pmodel).to(self.device),
                   len(idx), bad)

    def train_batches(self, pmodel, batch_size, epoch, start, seed):
        batches = list(epoch_batches(self.train_size, batch_size, epoch, seed))[start:]
        return self._run(self.train_loader, self.train_sampler, self.train_data, batches, epoch, pmodel)

    def val_batches(self, pmodel, batch_size):
        batches = val_index_batches(self.val_size, batch_size, pmodel.k)
        return self._run(self.val_loader, self.val_sampler, self.val_data, batches, 0, pmodel)

    def close(self) -> None:
        # Persistent workers exit with their iterators; drop the references.
        self.train_loader = self.val_loader = None


def _split(report: ScanReport, val_fraction: float, seed: int) -> Tuple[ScanReport, ScanReport]:
    n = len(report.samples)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val >= n:
        raise UserError(f"--val-fraction {val_fraction} leaves {n - n_val} training and {n_val} validation "
                        f"images out of {n}; use a value that keeps both non-empty")
    pick = lambda ids: [report.samples[i] for i in sorted(ids)]  # noqa: E731
    return (ScanReport(pick(perm[n_val:]), report.classes, report.skipped),
            ScanReport(pick(perm[:n_val]), report.classes, []))


def open_data(data: str, size: int, val_fraction: float, seed: int, device: torch.device,
              rank: int = 0, k: int = 1, exchange=None, loader_workers: int = 2, augment: bool = True,
              channels: int = 3, max_pixels: int = 64 * 2**20, max_file_bytes: int = 64 * 2**20,
              synthetic_size: int = 2048) -> DataSource:
    """The :class:`DataSource` for ``--data``: ``digits``, ``synthetic`` or an ImageFolder root.

    An ImageFolder root with ``train/`` and ``val/`` subfolders uses them as the split;
    otherwise ``val_fraction`` of its images (a seeded choice) are held out.
    ``rank``, ``k``, ``exchange``: share the image checks across ranks (see
    :func:`~pyowt.train.imagefolder.scan_image_folder`).
    """
    if data == "digits":
        from ..data import digits_dataset

        train, val = digits_dataset(size=size, val_fraction=val_fraction, seed=seed)
        return TensorSource("digits", train, val, 10, device, [str(i) for i in range(10)])
    if data == "synthetic":
        from ..data import synthetic_dataset

        n_val = max(k, int(round(synthetic_size * val_fraction)))
        train = synthetic_dataset(synthetic_size, size=size, seed=seed)
        val = synthetic_dataset(n_val, size=size, seed=seed + 1)
        return TensorSource("synthetic", train, val, 10, device)
    limits = (max_pixels, max_file_bytes)
    scan = dict(max_pixels=max_pixels, max_file_bytes=max_file_bytes, shard=(rank, k), exchange=exchange)
    train_dir, val_dir = os.path.join(data, "train"), os.path.join(data, "val")
    if os.path.isdir(train_dir) and os.path.isdir(val_dir):
        train, val = scan_image_folder(train_dir, **scan), scan_image_folder(val_dir, **scan)
        if train.classes != val.classes:
            raise UserError(f"--data: {train_dir!r} and {val_dir!r} have different class folders "
                            f"({train.classes[:5]}... vs {val.classes[:5]}...)")
    else:
        train, val = _split(scan_image_folder(data, **scan), val_fraction, seed)
    return FolderSource(data, train, val, size, channels, device, seed, loader_workers, augment, limits)
