"""``TrainConfig``: everything a training run needs, validated before any process starts."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional

from .errors import UserError
from .models import BUILTIN_MODELS

STRATEGIES = ("data", "model", "owt", "auto")
# Keys that must match between a checkpoint and the run resuming it: they fix the model's
# shapes and which samples each step sees.
RESUME_KEYS = ("model", "data", "batch_size", "seed", "image_size", "val_fraction", "channels")


@dataclass
class TrainConfig:
    model: str = "small"
    strategy: str = "owt"
    scheme: str = "a"
    fc_update: str = "accumulate"
    split_degree: Optional[int] = None
    data: str = "digits"
    epochs: int = 10
    batch_size: int = 64
    lr: Optional[float] = None            # 1e-3 for adamw, 0.05 for sgd
    momentum: float = 0.9
    weight_decay: Optional[float] = None  # 0.01 for adamw, 5e-4 for sgd
    optimizer: str = "adamw"
    lr_schedule: str = "cosine"
    warmup_epochs: float = 1.0
    workers: int = 1
    seed: int = 0
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    checkpoint_on_sigterm: bool = False
    resume: Optional[str] = None
    init_state_dict: Optional[str] = None
    image_size: Optional[int] = None
    val_fraction: float = 0.2
    val_batch_size: Optional[int] = None
    channels: int = 3
    augment: bool = True
    loader_workers: Optional[int] = None
    device: str = "auto"
    threads: Optional[int] = None
    precision: str = "auto"
    json: Optional[str] = None
    plot: Optional[str] = None
    progress: str = "auto"
    log_every: Optional[int] = None
    evaluate: bool = False
    max_image_pixels: int = 64 * 2**20
    max_image_bytes: int = 64 * 2**20

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls):
        return [f.name for f in fields(cls)]


def default_image_size(model: str, data: str) -> int:
    """32 for the small model and for digits/synthetic; 224 for torchvision models on real folders,
    64 for AlexNet on the in-memory data (its stride-4 stem and three pools need >= 63)."""
    if data in ("digits", "synthetic"):
        return 64 if model == "alexnet" else 32
    return 64 if model == "small" else 224


def _positive(name: str, value, minimum=1) -> None:
    if value is None or value < minimum:
        raise UserError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def _check_writable_folder(flag: str, folder: str) -> None:
    """Create ``folder`` if needed and write a file in it: a folder the run cannot write
    fails now, not at the first checkpoint an epoch later."""
    import tempfile

    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".pyowt-write-check-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag}: cannot write to {folder!r} ({e.strerror or e})") from e


def validate(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """Check every value (raising :class:`UserError` naming the flag) and fill the defaults
    that depend on others. ``world_size``: K, from torchrun's environment or ``--workers``."""
    import math

    if cfg.model not in BUILTIN_MODELS and ":" not in cfg.model:
        raise UserError(f"--model: unknown model {cfg.model!r}; expected one of {', '.join(BUILTIN_MODELS)} "
                        "or package.module:callable")
    s = cfg.strategy
    if s not in STRATEGIES and not s.endswith(".json"):
        raise UserError(f"--strategy: unknown strategy {s!r}; expected one of {', '.join(STRATEGIES)} or a plan .json file")
    if s.endswith(".json") and not os.path.isfile(s):
        raise UserError(f"--strategy: plan file {s!r} does not exist")
    if cfg.scheme not in ("a", "b", "c"):
        raise UserError(f"--scheme must be a, b or c, got {cfg.scheme!r}")
    if cfg.fc_update not in ("accumulate", "per_pass"):
        raise UserError(f"--fc-update must be accumulate or per_pass, got {cfg.fc_update!r}")
    if cfg.fc_update == "per_pass" and cfg.scheme == "a":
        raise UserError("--fc-update per_pass needs --scheme b or c (scheme a runs the head once per step)")
    if cfg.split_degree is not None:
        if cfg.strategy not in ("model", "owt"):
            raise UserError(f"--split-degree applies to --strategy model or owt (a plan file carries its own), "
                            f"got --strategy {cfg.strategy}")
        _positive("split_degree", cfg.split_degree)
        if world_size % cfg.split_degree:
            raise UserError(f"--split-degree must divide the {world_size} workers, got {cfg.split_degree}")
    if cfg.data not in ("digits", "synthetic") and not os.path.isdir(cfg.data):
        raise UserError(f"--data: {cfg.data!r} is neither 'digits', 'synthetic' nor an existing folder "
                        "(ImageFolder layout: <root>/<class>/<image>.jpg)")
    _positive("epochs", cfg.epochs, 0 if cfg.evaluate else 1)
    _positive("batch_size", cfg.batch_size)
    _positive("workers", cfg.workers)
    if cfg.batch_size < world_size:
        raise UserError(f"--batch-size {cfg.batch_size} is smaller than the {world_size} workers "
                        "(every worker needs at least one sample of each global batch)")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise UserError(f"--optimizer must be sgd or adamw, got {cfg.optimizer!r}")
    if cfg.lr is None:
        cfg.lr = 1e-3 if cfg.optimizer == "adamw" else 0.05
    if cfg.weight_decay is None:
        cfg.weight_decay = 0.01 if cfg.optimizer == "adamw" else 5e-4
    for name in ("lr", "momentum", "weight_decay", "warmup_epochs"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (name == "lr" and v == 0):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {v}")
    if cfg.momentum >= 1:
        raise UserError(f"--momentum must be < 1, got {cfg.momentum}")
    if cfg.lr_schedule not in ("cosine", "constant"):
        raise UserError(f"--lr-schedule must be cosine or constant, got {cfg.lr_schedule!r}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.image_size is None:
        cfg.image_size = default_image_size(cfg.model, cfg.data)
    _positive("image_size", cfg.image_size, 8)
    if cfg.image_size > 4096:
        raise UserError(f"--image-size must be <= 4096, got {cfg.image_size}")
    if cfg.val_batch_size is None:
        cfg.val_batch_size = max(cfg.batch_size, world_size)
    _positive("val_batch_size", cfg.val_batch_size, world_size)
    _positive("checkpoint_every", cfg.checkpoint_every, 0)
    if cfg.checkpoint_every and not cfg.checkpoint_dir:
        raise UserError("--checkpoint-every needs --checkpoint-dir")
    if cfg.checkpoint_on_sigterm and not cfg.checkpoint_dir:
        raise UserError("--checkpoint-on-sigterm needs --checkpoint-dir")
    if cfg.resume and cfg.resume != "auto" and not os.path.exists(cfg.resume):
        raise UserError(f"--resume: {cfg.resume!r} does not exist")
    if cfg.resume and cfg.init_state_dict:
        raise UserError("--resume and --init-state-dict exclude each other (a checkpoint holds the model already)")
    if cfg.init_state_dict and not os.path.isfile(cfg.init_state_dict):
        raise UserError(f"--init-state-dict: {cfg.init_state_dict!r} is not a file")
    if cfg.channels not in (1, 3):
        raise UserError(f"--channels must be 1 or 3, got {cfg.channels}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"--precision must be auto, fp32 or bf16, got {cfg.precision!r}")
    if cfg.progress not in ("auto", "bar", "lines", "none"):
        raise UserError(f"--progress must be auto, bar, lines or none, got {cfg.progress!r}")
    if cfg.log_every is not None:
        _positive("log_every", cfg.log_every)
    _positive("max_image_pixels", cfg.max_image_pixels)
    _positive("max_image_bytes", cfg.max_image_bytes)
    if cfg.threads is not None:
        _positive("threads", cfg.threads)
    if cfg.data not in ("digits", "synthetic"):
        from .imagefolder import list_image_folder

        list_image_folder(cfg.data)  # layout errors now, before any process starts
    if cfg.loader_workers is not None:
        _positive("loader_workers", cfg.loader_workers, 0)
    if cfg.checkpoint_dir:
        _check_writable_folder("--checkpoint-dir", cfg.checkpoint_dir)
    if cfg.json is None and cfg.checkpoint_dir:
        cfg.json = os.path.join(cfg.checkpoint_dir, "results.json")
    have_matplotlib = importlib.util.find_spec("matplotlib") is not None
    if cfg.plot and not have_matplotlib:
        raise UserError(f"--plot {cfg.plot}: drawing needs matplotlib (pip install matplotlib, or pyowt[demo])")
    if cfg.plot is None and cfg.json and have_matplotlib:  # no figure by default without it
        cfg.plot = os.path.splitext(cfg.json)[0] + ".png"
    for flag, path in (("--json", cfg.json), ("--plot", cfg.plot)):
        if path:
            if os.path.isdir(path):
                raise UserError(f"{flag}: {path!r} is a folder; name the file to write")
            _check_writable_folder(flag, os.path.dirname(os.path.abspath(path)))
    return cfg
