"""Real images that ship with a package: scikit-learn's handwritten digits, upscaled.

1797 grayscale 8x8 images of the digits 0-9 (the UCI optical-digits test set), bilinearly
upscaled so AlexNet-style trunks have room for their strides and pools.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def digits_dataset(size: int = 32, val_fraction: float = 0.2, seed: int = 0
                   ) -> Tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    """(train, val) TensorDatasets of ``(1, size, size)`` float images and int64 labels.

    The split is a seeded permutation, stratification-free but fixed for a given seed.
    Images are standardized with the training split's mean and std.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a declared extra
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if size < 8:
        raise ValueError(f"size must be >= 8 (the images are 8x8), got {size}")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(y) * val_fraction))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return (torch.utils.data.TensorDataset(x[train_idx], y[train_idx]),
            torch.utils.data.TensorDataset(x[val_idx], y[val_idx]))


def synthetic_dataset(n: int, channels: int = 3, size: int = 32, num_classes: int = 10, seed: int = 0
                      ) -> torch.utils.data.TensorDataset:
    """``n`` random images (standard normal) with random labels, for throughput runs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return torch.utils.data.TensorDataset(x, y)
