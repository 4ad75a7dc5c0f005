"""Training checkpoints: written atomically by rank 0, safe to load, independent of K.

A checkpoint is one ``torch.save`` file holding only tensors, dicts, lists, numbers and
strings, so it loads with ``torch.load(..., weights_only=True)``: opening a checkpoint
cannot run code. It holds:

- ``model``: the full single-process ``state_dict`` (:func:`pyowt.parallel.full_state_dict`),
  loadable into the original model and reshardable for any number of workers;
- ``optimizer`` (and ``head_optimizer`` for ``fc_update="per_pass"``): the optimizer state
  with every tensor unsplit and keyed by parameter name;
- ``progress``: epoch, global batches done in it, global step, and the parallel model's
  step counter (it keys the dropout masks);
- ``rng``: torch (CPU and CUDA), Python and NumPy generator states;
- ``config`` (what must match to resume) and ``history`` (losses so far, per-epoch results).

Files are ``step_00000123.pt`` in the checkpoint folder; a write goes to a temporary file in
the same folder, is flushed to disk, then renamed over the final name, so a run killed in the
middle of a write leaves the previous checkpoint intact and never a half-written one.
"""
from __future__ import annotations

import os
import pickle
import random
import re
from typing import Optional

import numpy as np
import torch

from .errors import UserError

FORMAT = "pyowt.train.checkpoint/1"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def rng_state() -> dict:
    """Every generator's state, as tensors and numbers only."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_atomic(payload: dict, path: str) -> None:
    """``torch.save(payload, path)`` such that ``path`` is either the old file or the new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_checkpoints(folder: str) -> list:
    """``(step, path)`` of the complete checkpoints in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def prune(folder: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep`` <= 0 keeps all)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(folder)[:-keep]:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def resolve_resume(resume: Optional[str], checkpoint_dir: Optional[str]) -> Optional[str]:
    """The file ``--resume`` names: ``auto`` = newest in ``checkpoint_dir`` (None if there is
    none yet: a fresh start), a folder = newest in it, else the file itself."""
    if resume is None:
        return None
    if resume == "auto":
        if not checkpoint_dir:
            raise UserError("--resume auto needs --checkpoint-dir (the folder to look in)")
        found = list_checkpoints(checkpoint_dir)
        return found[-1][1] if found else None
    if os.path.isdir(resume):
        found = list_checkpoints(resume)
        if not found:
            raise UserError(f"--resume: no checkpoint (step_*.pt) in folder {resume!r}")
        return found[-1][1]
    if not os.path.isfile(resume):
        raise UserError(f"--resume: {resume!r} is neither a checkpoint file nor a folder")
    return resume


def load_file(path: str, what: str) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, errors as :class:`UserError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise UserError(f"{what}: no such file {path!r}") from e
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
        # torch's weights-only refusal names the offending global on a later line.
        first = next((ln for ln in lines if "Unsupported global" in ln), lines[0])
        raise UserError(f"{what}: {path!r} is not a loadable weights-only torch file ({first})") from e


def load_checkpoint(path: str) -> dict:
    """A training checkpoint written by :func:`save_atomic` (format checked)."""
    ckpt = load_file(path, "--resume")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"--resume: {path!r} is not a pyowt training checkpoint (format {FORMAT!r}); "
                        "to start from a plain state_dict use --init-state-dict")
    return ckpt


def load_plain_state_dict(path: str) -> dict:
    """A single-process model ``state_dict`` (also accepted: a training checkpoint, or a dict
    with a ``state_dict`` / ``model`` entry; a ``module.`` prefix from DDP is dropped)."""
    sd = load_file(path, "--init-state-dict")
    if isinstance(sd, dict):
        for key in ("model", "state_dict"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"--init-state-dict: {path!r} does not hold a state_dict (a dict of tensors)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd
