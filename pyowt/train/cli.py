"""``pyowt train``: train a CNN with a parallel strategy, on your images or the bundled ones.

Two ways to run K workers:

- ``pyowt train --workers K ...`` spawns K processes on this machine, joined through a
  rendezvous bound to 127.0.0.1 only (nothing outside the machine can reach it);
- ``torchrun --nproc-per-node K [--nnodes N --rdzv-endpoint host:port ...] -m pyowt train ...``
  (or ``python -m pyowt.train.cli``): every process joins torchrun's group, which can span
  several machines.

NCCL with one GPU per local rank when CUDA is available, Gloo on CPU; bf16 autocast on GPUs.
Bad input exits with status 2 and a one-paragraph message (no traceback); a failure inside
a worker exits with 1 and the worker's traceback. Ctrl-C during training stops every rank
after the same step, writes a checkpoint and exits with 130 (a second Ctrl-C quits at once);
with --checkpoint-on-sigterm a SIGTERM does the same and exits with 143.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from typing import List, Optional

from .config import STRATEGIES, TrainConfig, validate
from .errors import UserError
from .interrupt import TrainingInterrupted

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("model and strategy")
    g.add_argument("--model", default=d.model, help="small, alexnet, vgg11, or package.module:callable "
                   "(called with num_classes=, and in_channels= when it takes it) [%(default)s]")
    g.add_argument("--strategy", default=d.strategy, help=f"{', '.join(STRATEGIES)}, or a plan .json file [%(default)s]")
    g.add_argument("--scheme", default=d.scheme, choices=["a", "b", "c"], help="OWT scheme [%(default)s]")
    g.add_argument("--fc-update", default=d.fc_update, choices=["accumulate", "per_pass"],
                   help="OWT head update for schemes b/c [%(default)s]")
    g.add_argument("--split-degree", type=int, default=d.split_degree,
                   help="model/owt: split the split layers over groups of this many workers, data-parallel "
                        "across the groups (a divisor of the worker count; default: all workers)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="digits, synthetic, or a folder in ImageFolder layout "
                   "(<root>/<class>/<image>; with train/ and val/ subfolders they are the split) [%(default)s]")
    g.add_argument("--image-size", type=int, default=None, help="image side in pixels "
                   "[32 for small and digits, 224 for alexnet/vgg11 on folders]")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction, help="held-out share [%(default)s]")
    g.add_argument("--channels", type=int, default=d.channels, choices=[1, 3], help="folder images as gray or RGB [%(default)s]")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no random crop/flip on folders")
    g.add_argument("--loader-workers", type=int, default=None, help="DataLoader processes per rank [cores / ranks, <= 8]")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="reject larger images [%(default)s]")
    g.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes, help="reject larger files [%(default)s]")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=d.epochs, help="[%(default)s]")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, over all workers [%(default)s]")
    g.add_argument("--val-batch-size", type=int, default=None, help="[--batch-size]")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate [1e-3 for adamw, 0.05 for sgd]")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum [%(default)s]")
    g.add_argument("--weight-decay", type=float, default=None, help="not on biases [0.01 for adamw, 5e-4 for sgd]")
    g.add_argument("--optimizer", default=d.optimizer, choices=["sgd", "adamw"], help="[%(default)s]")
    g.add_argument("--lr-schedule", default=d.lr_schedule, choices=["cosine", "constant"], help="[%(default)s]")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up [%(default)s]")
    g.add_argument("--seed", type=int, default=d.seed, help="initialization, data order, dropout [%(default)s]")
    g = p.add_argument_group("processes and devices")
    g.add_argument("--workers", type=int, default=d.workers,
                   help="spawn K local workers (loopback only); under torchrun leave it at 1 [%(default)s]")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker [cores / workers with --workers; torch's default otherwise]")
    g.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"], help="[%(default)s]")
    g.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on GPUs, fp32 on CPU [%(default)s]")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-dir", default=None, help="write checkpoints (and results.json/.png) here")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="also checkpoint every N steps (0: at epoch ends only) [%(default)s]")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help="keep the newest N (0: all) [%(default)s]")
    g.add_argument("--checkpoint-on-sigterm", action="store_true",
                   help="on SIGTERM (a scheduler's preemption, `kill`), stop every rank after the same step "
                        "and checkpoint there, as on Ctrl-C; exit status 143 (default: SIGTERM ends the run "
                        "where it is)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a checkpoint file or folder; 'auto' (or no value): the newest in "
                        "--checkpoint-dir, a fresh start if there is none")
    g.add_argument("--init-state-dict", default=None, help="start from a plain single-process state_dict .pt")
    g = p.add_argument_group("output")
    g.add_argument("--json", default=None, help="results JSON [<checkpoint-dir>/results.json]")
    g.add_argument("--plot", default=None, help="results PNG [the JSON's name with .png]")
    g.add_argument("--progress", default=d.progress, choices=["auto", "bar", "lines", "none"],
                   help="auto: a bar on a terminal, lines otherwise [%(default)s]")
    g.add_argument("--log-every", type=int, default=None, help="steps between progress lines [epoch/5]")
    g.add_argument("--evaluate", action="store_true", help="only validate (e.g. with --init-state-dict or --resume)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{k: getattr(args, k) for k in TrainConfig.field_names() if hasattr(args, k)})


def _under_torchrun() -> bool:
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _spawned(cfg: TrainConfig):
    """Train on the process group this process is in (a ``--workers`` process, or this one):
    the results, or what stopped the run, as a picklable dict for the launcher."""
    from .loop import run

    try:
        return {"results": run(cfg)}
    except UserError as e:
        return {"user_error": str(e)}
    except TrainingInterrupted as e:
        return {"interrupted": (e.global_step, e.checkpoint, e.signum)}


def _error(msg: str) -> int:
    print(f"pyowt train: error: {msg}", file=sys.stderr)
    return EXIT_USER_ERROR


def _exit_status(outcome: dict, rank: int = 0) -> int:
    """The exit status for what :func:`_spawned` returned; rank 0 says what went wrong."""
    if "user_error" in outcome:
        return _error(outcome["user_error"]) if rank == 0 else EXIT_USER_ERROR
    if "interrupted" in outcome:
        stop = TrainingInterrupted(*outcome["interrupted"])
        if rank == 0:
            print(stop.describe(), file=sys.stderr)
        return stop.exit_status
    return 0


def _run_in_group(cfg: TrainConfig, rank: int) -> int:
    """Train on the process group this process has joined, then leave it; the exit status."""
    import torch.distributed as dist

    try:
        return _exit_status(_spawned(cfg), rank)
    finally:
        dist.destroy_process_group()


def _run_torchrun(cfg: TrainConfig) -> int:
    import torch

    from .. import distributed as pdist

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    try:
        if cfg.workers != 1:
            raise UserError("--workers spawns processes itself; under torchrun set the count with "
                            "torchrun --nproc-per-node (and --nnodes) instead")
        validate(cfg, world)
    except UserError as e:
        return _exit_status({"user_error": str(e)}, rank)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pdist.init(backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    return _run_in_group(cfg, rank)


def _run_local(cfg: TrainConfig) -> int:
    import torch
    import torch.distributed as dist

    from ..launch import WorkerFailed, spawn

    try:
        validate(cfg, cfg.workers)
        use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if use_cuda and cfg.workers > torch.cuda.device_count():
            raise UserError(f"--workers {cfg.workers} needs one GPU each, but {torch.cuda.device_count()} "
                            "are visible (use --device cpu to run on CPU)")
    except UserError as e:
        return _error(str(e))
    backend = "nccl" if use_cuda else "gloo"
    if cfg.workers == 1:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # One process: a group of one, its store in this process (no port to take).
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(minutes=30))
        return _run_in_group(cfg, 0)
    # By module path, not this module's globals: under ``python -m pyowt.train.cli`` this
    # module is __main__, whose functions the spawned processes cannot import by name.
    from .cli import _spawned as entry

    try:
        # Ctrl-C (SIGTERM with --checkpoint-on-sigterm) goes on to the workers, which finish
        # the step and checkpoint (loop.py).
        outs = spawn(entry, cfg.workers, args=(cfg,), backend=backend, timeout_s=1800.0, threads=cfg.threads,
                     graceful_interrupt=True, forward_sigterm=cfg.checkpoint_on_sigterm)
    except WorkerFailed as e:
        print(f"pyowt train: a worker failed:\n{e}", file=sys.stderr)
        return 1
    # A user error on any rank first; else rank 0's outcome (it holds the checkpoint's path).
    return _exit_status(next((o for o in outs if "user_error" in o), outs[0]))


def run_train(cfg: TrainConfig) -> int:
    """Run ``cfg`` under torchrun's group if launched by it, else on ``cfg.workers`` local processes.
    Returns the exit status."""
    return _run_torchrun(cfg) if _under_torchrun() else _run_local(cfg)


def _cmd_train(args: argparse.Namespace) -> int:
    return run_train(config_from_args(args))


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``pyowt``'s subparsers."""
    p = subparsers.add_parser("train", help="train a model with a parallel strategy (own data, torchrun, "
                              "checkpoints, resume)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_cmd_train)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="pyowt train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return _cmd_train(args)
    except KeyboardInterrupt:  # under torchrun every rank gets it: one line each, no traceback
        print("pyowt train: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
