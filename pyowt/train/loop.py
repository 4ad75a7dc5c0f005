"""The training run every rank executes: set up, resume, train, validate, checkpoint, report.

Exact resume rests on every input of a step being a function of saved state: parameters and
optimizer state (checkpointed unsplit), the global batch (a permutation seeded by
(seed, epoch), and the number of batches already done in the epoch), augmentation (keyed by
(seed, epoch, sample)), dropout masks (keyed by the parallel model's step counter), the
learning rate (a function of the global step) and the generators (saved too, for models that
draw from them). At the same K the resumed loss curve is bit-identical to the uninterrupted
one; at another K it agrees to fp32 rounding (sums are taken over different splits).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import distributed as pdist
from ..parallel import (full_optimizer_state_dict, full_state_dict, load_full_optimizer_state_dict,
                        load_full_state_dict, parallelize)
from ..models.shapes import image_size_problem
from ..parallel.layout import Layout
from . import checkpoint as ckpt_io
from .config import RESUME_KEYS, TrainConfig
from .data import open_data
from .errors import UserError
from .interrupt import StopRequest, TrainingInterrupted
from .models import build_model
from .progress import Progress, format_duration
from .results import write_results


def _agree(fn: Callable, k: int):
    """Run ``fn`` on every rank; if it raised :class:`UserError` anywhere, raise it everywhere
    (a rank alone with an error would leave the others waiting in the next collective)."""
    try:
        value, err = fn(), None
    except UserError as e:
        value, err = None, str(e)
    if k > 1:
        errs = [None] * k
        dist.all_gather_object(errs, err)
        err = next((e for e in errs if e is not None), None)
    if err is not None:
        raise UserError(err)
    return value


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    params = list(params)
    # No weight decay on biases (1-D), as is usual for CNNs.
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def learning_rate(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The learning rate of global step ``step`` (0-based): linear warm-up, then cosine or constant."""
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.lr_schedule == "constant" or total_steps <= warm:
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / (total_steps - warm)))


def _check_image_size(model, cfg: TrainConfig, in_channels: int) -> None:
    problem = image_size_problem(model, in_channels, cfg.image_size)
    if problem is not None:
        raise UserError(f"--model {cfg.model} cannot run on {in_channels}-channel {cfg.image_size}x{cfg.image_size} "
                        f"images ({problem}); check --image-size (too small for its strides and pools?) and the "
                        "channels it expects (--channels for folders; digits are 1-channel)")


@torch.no_grad()
def evaluate(pmodel, source, batch_size: int, autocast) -> dict:
    """Validation loss and accuracy over the whole validation set (the same on every rank).

    The logits of a split head are class-sharded: they are gathered along the classes (a
    small all-gather) so that every rank takes the arg-max over all classes.
    """
    was_training = pmodel.training
    pmodel.eval()
    dev = next(pmodel.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64, device=dev)  # loss sum, correct
    n = 0
    for x, y, b, _ in source.val_batches(pmodel, batch_size):
        with autocast():
            out = pmodel(x, global_batch=b)
        out = pmodel.full_logits(out.float())
        sums[0] += F.cross_entropy(out, y, reduction="sum").double()
        sums[1] += (out.argmax(1) == y).sum().double()
        n += b
    sums = pmodel.sum_over_batch(sums)
    pmodel.train(was_training)
    loss, correct = sums.tolist()
    return {"val_loss": loss / n, "val_acc": correct / n, "val_samples": n}


class _Checkpointer:
    def __init__(self, cfg: TrainConfig, pmodel, opt, rank: int, k: int, meta: dict):
        self.cfg, self.pmodel, self.opt, self.rank, self.k, self.meta = cfg, pmodel, opt, rank, k, meta

    def save(self, epoch: int, batch_in_epoch: int, global_step: int, history: dict) -> Optional[str]:
        """Collective (the gathers); rank 0 writes. Returns the path on rank 0. A failed write
        (disk full, say) raises :class:`UserError` on every rank, not on rank 0 alone."""
        model = full_state_dict(self.pmodel)
        optim = full_optimizer_state_dict(self.pmodel, self.opt)
        head = self.pmodel.head_optimizer
        head_optim = full_optimizer_state_dict(self.pmodel, head) if head is not None else None
        return _agree(lambda: self._write(model, optim, head_optim, epoch, batch_in_epoch, global_step, history),
                      self.k)

    def _write(self, model, optim, head_optim, epoch, batch_in_epoch, global_step, history) -> Optional[str]:
        if self.rank != 0:
            return None
        payload = {
            "format": ckpt_io.FORMAT,
            "model": _to_cpu(model), "optimizer": _to_cpu(optim), "head_optimizer": _to_cpu(head_optim),
            "progress": {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "global_step": global_step,
                         "pmodel_steps": int(self.pmodel._steps)},
            "rng": ckpt_io.rng_state(),
            "config": {k: getattr(self.cfg, k) for k in RESUME_KEYS},
            "meta": self.meta,
            "history": copy.deepcopy(history),
        }
        path = os.path.join(self.cfg.checkpoint_dir, ckpt_io.checkpoint_name(global_step))
        try:
            ckpt_io.save_atomic(payload, path)
            ckpt_io.prune(self.cfg.checkpoint_dir, self.cfg.keep_checkpoints)
        except OSError as e:
            newest = ckpt_io.list_checkpoints(self.cfg.checkpoint_dir)
            raise UserError(f"--checkpoint-dir: could not write {path} ({e.strerror or e}); the run stopped "
                            f"after global step {global_step}; the newest checkpoint is "
                            f"{newest[-1][1] if newest else 'none'}") from e
        return path


def _check_resume_config(ckpt: dict, cfg: TrainConfig, path: str) -> None:
    saved = ckpt.get("config", {})
    diff = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, now {getattr(cfg, k)!r}"
            for k in RESUME_KEYS if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise UserError(f"--resume {path}: the checkpoint was written with other settings, so the data "
                        "order or the model would differ:\n  " + "\n  ".join(diff))


def run(cfg: TrainConfig) -> Optional[dict]:
    """Train on the current process group (every rank calls this). Returns the results on rank 0."""
    k, rank = pdist.get_world_size(), pdist.get_rank()
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    bf16 = use_cuda and cfg.precision in ("auto", "bf16")
    if cfg.precision == "bf16" and not use_cuda:
        raise UserError("--precision bf16 needs a CUDA device (CPU runs in fp32)")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    say = print if rank == 0 else (lambda *a, **kw: None)

    def gather_objects(obj):
        out = [None] * k
        dist.all_gather_object(out, obj)
        return out

    loader_workers = cfg.loader_workers
    if loader_workers is None:
        loader_workers = max(1, min(8, (os.cpu_count() or 2) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", k)))))
    source = _agree(lambda: open_data(
        cfg.data, cfg.image_size, cfg.val_fraction, cfg.seed, device, rank=rank, k=k, exchange=gather_objects,
        loader_workers=loader_workers, augment=cfg.augment, channels=cfg.channels,
        max_pixels=cfg.max_image_pixels, max_file_bytes=cfg.max_image_bytes), k)
    try:
        return _train(cfg, source, device, autocast, bf16, k, rank, say)
    finally:
        source.close()


def _train(cfg, source, device, autocast, bf16, k, rank, say) -> Optional[dict]:
    steps_per_epoch = source.steps_per_epoch(cfg.batch_size)
    if steps_per_epoch < 1 and not cfg.evaluate:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {source.train_size} training images")
    if source.report is not None:
        say(f"data: {cfg.data}: train {source.report.summary()}")
        if source.val_report is not None and source.val_report.skipped:
            say(f"data: validation {source.val_report.summary()}")
    pmodel, opt = _build(cfg, source, device, k)
    optimizers = [o for o in (opt, pmodel.head_optimizer) if o is not None]

    total_steps = cfg.epochs * steps_per_epoch
    epoch, start_batch, global_step, history = _resume(cfg, pmodel, opt, k, steps_per_epoch, say)
    meta = {"world_size": k, "device": str(device), "backend": pdist.get_backend(), "plan": pmodel.plan.name,
            "num_classes": source.num_classes, "classes": source.classes[:1000],
            "train_size": source.train_size, "val_size": source.val_size, "bf16": bf16,
            "torch": str(torch.__version__)}
    saver = _Checkpointer(cfg, pmodel, opt, rank, k, meta) if cfg.checkpoint_dir else None
    progress = Progress(total_steps, steps_per_epoch, cfg.epochs, cfg.batch_size, enabled=rank == 0,
                        mode=cfg.progress, every=cfg.log_every)
    say(f"pyowt train: {cfg.model} on {cfg.data} ({source.train_size} train / {source.val_size} val images, "
        f"{source.num_classes} classes, {cfg.image_size}x{cfg.image_size}), strategy {pmodel.plan.name}, "
        f"K={k} ({meta['backend']}, {device.type}{', bf16' if bf16 else ''}), global batch {cfg.batch_size}, "
        f"{steps_per_epoch} steps/epoch")
    t_run = time.perf_counter()
    bad_images = torch.zeros((), dtype=torch.int64)

    if cfg.evaluate:
        result = evaluate(pmodel, source, cfg.val_batch_size, autocast)
        say(f"validation: loss {result['val_loss']:.4f}, accuracy {100 * result['val_acc']:.2f}% "
            f"({result['val_samples']} images)")
        history["evaluation"] = result
    pmodel.train()
    progress.start(global_step)
    # Ctrl-C (and SIGTERM if asked): every rank stops after the same step, writes a checkpoint,
    # raises TrainingInterrupted.
    with StopRequest(announce=rank == 0, saving=saver is not None,
                     on_sigterm=cfg.checkpoint_on_sigterm) as stop_request:
        while not cfg.evaluate and epoch < cfg.epochs:
            pending: List[torch.Tensor] = []
            t_epoch, steps_here = time.perf_counter(), 0

            def flush():
                if pending:
                    history["loss"].extend(torch.stack(pending).tolist())
                    pending.clear()

            for i, (x, y, b, bad) in enumerate(source.train_batches(pmodel, cfg.batch_size, epoch, start_batch, cfg.seed),
                                               start=start_batch + 1):
                bad_images += bad
                lr = learning_rate(cfg, global_step, total_steps, steps_per_epoch)
                for o in optimizers:
                    for g in o.param_groups:
                        g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                with autocast():
                    out = pmodel(x, global_batch=b)
                    loss = pmodel.loss(out.float() if bf16 else out, y)
                loss.backward()
                opt.step()
                global_step += 1
                steps_here += 1
                pending.append(loss.detach().float())
                history["lr"].append(lr)
                progress.step(epoch, i, global_step, loss.detach())
                stop_signal = stop_request.poll()
                if stop_signal:
                    flush()
                    progress.end_line()
                    # At an epoch's last step too: the resumed run then validates that epoch.
                    path = saver.save(epoch, i, global_step, history) if saver else None
                    if cfg.json:
                        # the checkpoint's path on every rank (save() returns it on rank 0)
                        saved = (os.path.join(cfg.checkpoint_dir, ckpt_io.checkpoint_name(global_step))
                                 if saver else None)
                        _write_json(lambda: {**_results(cfg, meta, history, source, 0, time.perf_counter() - t_run),
                                             "interrupted_after_step": global_step},
                                    cfg.json, rank, k, stopped_after=(global_step, saved))
                    raise TrainingInterrupted(global_step, path, stop_signal)
                if saver and cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and i < steps_per_epoch:
                    flush()
                    progress.pause()
                    saver.save(epoch, i, global_step, history)
                    progress.resume()
            flush()
            train_time = time.perf_counter() - t_epoch
            progress.pause()
            t_val = time.perf_counter()
            val = evaluate(pmodel, source, cfg.val_batch_size, autocast)
            first = epoch * steps_per_epoch
            epoch_losses = history["loss"][first:first + steps_per_epoch]
            record = {"epoch": epoch + 1, "global_step": global_step,
                      "train_loss": sum(epoch_losses) / max(1, len(epoch_losses)),
                      "images_per_s": steps_here * cfg.batch_size / train_time if steps_here else float("nan"),
                      "train_seconds": train_time, "val_seconds": time.perf_counter() - t_val, **val}
            history["epochs"].append(record)
            progress.message(f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f}, "
                             f"val loss {val['val_loss']:.4f}, val acc {100 * val['val_acc']:.2f}%, "
                             f"{record['images_per_s']:,.0f} img/s, {format_duration(time.perf_counter() - t_epoch)}")
            epoch, start_batch = epoch + 1, 0
            if saver:
                path = saver.save(epoch, 0, global_step, history)
                if path:
                    progress.message(f"checkpoint: {path}")
            if cfg.json:
                _write_json(lambda: _results(cfg, meta, history, source, 0, time.perf_counter() - t_run),
                            cfg.json, rank, k)
            progress.resume()
        if stop_request.requested and rank == 0:  # after the last step: nothing left to stop
            progress.end_line()
            print(f"pyowt train: the stop request came after the last training step "
                  f"(global step {global_step}); the run finishes as usual", file=sys.stderr, flush=True)

    # Images are loaded per shard, or per split group's block (every rank of it the same).
    loaders = pmodel.group if pmodel.input_layout == Layout.SHARD_BATCH else pmodel.input_mesh.replica_group
    if loaders is not None and pdist.get_world_size(loaders) > 1:
        bad_images = bad_images.to(device)
        dist.all_reduce(bad_images, group=loaders)
    results = _results(cfg, meta, history, source, int(bad_images), time.perf_counter() - t_run)
    if rank != 0:
        return None
    _summary(results, say)
    if cfg.json or cfg.plot:
        for path in _write_results(results, cfg.json, cfg.plot):
            say(f"results written to {path}")
    return results


def _write_json(results: Callable[[], dict], json_path: str, rank: int, k: int,
                stopped_after: Optional[tuple] = None) -> None:
    """Rank 0 writes ``results()`` (called there only) to ``json_path``; a failure to write (a
    full disk) stops every rank with the same :class:`UserError`. ``stopped_after``: an
    interrupted run's (global step, checkpoint path or None), which the error then names."""
    try:
        _agree(lambda: _write_results(results(), json_path, None) if rank == 0 else None, k)
    except UserError as e:
        if stopped_after is None:
            raise
        step, checkpoint = stopped_after
        saved = f"; checkpoint written to {checkpoint} (continue with --resume)" if checkpoint else ""
        raise UserError(f"{e}; the run was interrupted after global step {step}{saved}") from None


def _write_results(results: dict, json_path: Optional[str], plot_path: Optional[str]) -> List[str]:
    """:func:`write_results`, with a failure to write (a full disk) as a :class:`UserError`."""
    written = []
    for flag, path, paths in (("--json", json_path, (json_path, None)), ("--plot", plot_path, (None, plot_path))):
        if path:
            try:
                written += write_results(results, *paths)
            except OSError as e:
                raise UserError(f"{flag}: could not write {path} ({e.strerror or e})") from e
    return written


def _build(cfg: TrainConfig, source, device: torch.device, k: int):
    """The model (seeded, or from --init-state-dict), parallelized, and its optimizer; errors
    the user can cause are :class:`UserError` on every rank."""
    model = _agree(lambda: build_model(cfg.model, source.num_classes, source.in_channels, cfg.seed), k)
    _agree(lambda: _check_image_size(model, cfg, source.in_channels), k)
    if cfg.init_state_dict:
        def _init():
            sd = ckpt_io.load_plain_state_dict(cfg.init_state_dict)
            try:
                model.load_state_dict(sd)
            except RuntimeError as e:
                raise UserError(f"--init-state-dict {cfg.init_state_dict}: does not fit --model {cfg.model}: "
                                f"{str(e).strip().splitlines()[0]} ...") from e
        _agree(_init, k)
    model.to(device)
    head_opt = (lambda ps: _optimizer(cfg, ps)) if cfg.fc_update == "per_pass" else None

    def _parallelize():
        try:
            options = {"scheme": cfg.scheme, "fc_update": cfg.fc_update} if cfg.strategy == "owt" else {}
            if cfg.split_degree is not None:
                options["split_degree"] = cfg.split_degree
            if cfg.strategy == "auto":  # the search costs the global batch's shape
                options["input_shape"] = (cfg.batch_size, source.in_channels, cfg.image_size, cfg.image_size)
            return parallelize(model, cfg.strategy, seed=cfg.seed, head_optimizer=head_opt, **options)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise UserError(f"--strategy {cfg.strategy}: {e}") from e
    pmodel = _agree(_parallelize, k)
    opt = _optimizer(cfg, pmodel.trunk_parameters() if pmodel.head_optimizer is not None else pmodel.parameters())
    return pmodel, opt


def _resume(cfg: TrainConfig, pmodel, opt, k: int, steps_per_epoch: int, say):
    """Load ``--resume``'s checkpoint into the model, optimizers and generators, if there is
    one. Returns (epoch, batches done in it, global step, history)."""
    resume_path = _agree(lambda: ckpt_io.resolve_resume(cfg.resume, cfg.checkpoint_dir), k)
    if not resume_path:
        return 0, 0, 0, {"loss": [], "lr": [], "epochs": []}
    ckpt = _agree(lambda: ckpt_io.load_checkpoint(resume_path), k)
    _agree(lambda: _check_resume_config(ckpt, cfg, resume_path), k)

    def _load():
        try:
            load_full_state_dict(pmodel, ckpt["model"])
            load_full_optimizer_state_dict(pmodel, opt, ckpt["optimizer"])
            if pmodel.head_optimizer is not None:
                if ckpt.get("head_optimizer") is None:
                    raise ValueError("the checkpoint has no head optimizer state (it was not written with "
                                     "--fc-update per_pass)")
                load_full_optimizer_state_dict(pmodel, pmodel.head_optimizer, ckpt["head_optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"--resume {resume_path}: {e}") from e
    _agree(_load, k)
    prog = ckpt["progress"]
    epoch, start_batch, global_step = prog["epoch"], prog["batch_in_epoch"], prog["global_step"]
    pmodel._steps = prog["pmodel_steps"]
    ckpt_io.set_rng_state(ckpt["rng"])
    history = ckpt["history"]
    say(f"resumed from {resume_path}: epoch {epoch + 1}, batch {start_batch} of {steps_per_epoch}, "
        f"global step {global_step} (checkpoint written with K={ckpt['meta'].get('world_size')}, now K={k})")
    return epoch, start_batch, global_step, history


def _results(cfg, meta, history, source, bad_at_load: int, seconds: float) -> dict:
    skipped = source.report.skipped + (source.val_report.skipped if source.val_report else []) \
        if source.report is not None else []
    return {"config": cfg.to_dict(), "meta": meta, "history": history, "seconds": seconds,
            "images": {"skipped_corrupt": sum(1 for s in skipped if s[1] == "corrupt"),
                       "skipped_oversized": sum(1 for s in skipped if s[1] == "oversized"),
                       "failed_at_load": bad_at_load,
                       "skipped": [list(s) for s in skipped[:100]]}}


def _summary(results: dict, say) -> None:
    epochs = results["history"]["epochs"]
    img = results["images"]
    if epochs:
        best = max(epochs, key=lambda e: e["val_acc"])
        last = epochs[-1]
        say(f"done in {format_duration(results['seconds'])}: final val acc {100 * last['val_acc']:.2f}% "
            f"(best {100 * best['val_acc']:.2f}% at epoch {best['epoch']}), val loss {last['val_loss']:.4f}")
    if img["skipped_corrupt"] or img["skipped_oversized"] or img["failed_at_load"]:
        say(f"images: skipped {img['skipped_corrupt']} corrupt and {img['skipped_oversized']} oversized files; "
            f"{img['failed_at_load']} failed to decode during training (fed as blank images)")
