"""Shared pieces of the pyowt train tests: small configs, a tiny image folder, runners."""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from pyowt.train.config import TrainConfig, validate


def small_config(**overrides) -> TrainConfig:
    """A run that takes a second or two on CPU: digits at 16x16, half held out, 32 per batch."""
    base = TrainConfig(model="small", strategy="owt", data="digits", epochs=2, batch_size=32, image_size=16,
                       val_fraction=0.5, seed=3, progress="none", loader_workers=0, warmup_epochs=0.2)
    return replace(base, **overrides)


def run_config(cfg: TrainConfig):
    """Module-level entry for the run_workers pool: validate and train on the pool's group."""
    import torch.distributed as dist

    from pyowt.train.loop import run

    cfg = validate(replace(cfg), dist.get_world_size())
    return run(cfg)


def write_png(path: str, size=(20, 20), seed: int = 0, mode: str = "RGB") -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def make_folder(root: str, classes=("cat", "dog"), per_class: int = 6, size=(20, 20)) -> str:
    """An ImageFolder tree of small random PNGs (class 'dog' brighter, so it is learnable)."""
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            write_png(os.path.join(root, name, f"{i}.png"), size, seed=100 * c + i)
    return root
