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


def small_model_that_interrupts(num_classes: int, in_channels: int):
    """``--model tests.train._helpers:small_model_that_interrupts``: ``--model small``'s network
    (same initialization, same losses) whose training forward number ``$PYOWT_TEST_SIGINT_AT``
    (counted from 1 in this process, on rank ``$PYOWT_TEST_SIGINT_RANK``, default 0) sends
    this process a SIGINT, as ``kill -INT`` would: a Ctrl-C that arrives at a known step.
    With ``$PYOWT_TEST_SIGINT_GROUP=1`` it goes to the whole process group, as a terminal's
    Ctrl-C does (run the command in a session of its own). With ``$PYOWT_TEST_SIGINT_IN=val``
    the count is of validation forwards instead. ``$PYOWT_TEST_SIGINT_SIGNAL=SIGTERM``: that
    signal instead, to the parent process (the launcher, as `kill <pid>` would)."""
    import signal

    import torch

    from pyowt.models import AlexNetSmall

    model = AlexNetSmall(num_classes=num_classes, in_channels=in_channels)
    at = int(os.environ.get("PYOWT_TEST_SIGINT_AT", "0"))
    if not at or os.environ.get("RANK", "0") != os.environ.get("PYOWT_TEST_SIGINT_RANK", "0"):
        return model
    in_validation = os.environ.get("PYOWT_TEST_SIGINT_IN", "train") == "val"
    calls = [0]

    def hook(module, args):
        # A pooling layer: parallelize() keeps the module (and so its hooks) in every strategy.
        # Training steps (with gradients: not the no-grad shape check on a copy), or validation.
        if in_validation == module.training or (module.training and not torch.is_grad_enabled()):
            return
        calls[0] += 1
        if calls[0] == at:
            if os.environ.get("PYOWT_TEST_SIGINT_SIGNAL") == "SIGTERM":
                os.kill(os.getppid(), signal.SIGTERM)
            elif os.environ.get("PYOWT_TEST_SIGINT_GROUP") == "1":
                os.killpg(os.getpgid(0), signal.SIGINT)
            else:
                os.kill(os.getpid(), signal.SIGINT)

    model.features[2].register_forward_pre_hook(hook)
    return model
