"""Process groups: start-up, and the one rule for what ``group=`` means everywhere.

Every collective in :mod:`pyowt.distributed` takes ``group`` as one of

- ``None``: the default (world) group;
- a :class:`torch.distributed.ProcessGroup` this rank belongs to;
- a 1-D :class:`torch.distributed.device_mesh.DeviceMesh` (its only dimension's group).

Ranks given to collectives (``src`` of :func:`broadcast`, ``dst`` of :func:`reduce_to`) are
ranks *within that group* (0..K-1), not global ranks: OWT's "worker j" is a group rank.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["init", "is_initialized", "resolve_group", "get_rank", "get_world_size",
           "get_backend", "global_rank"]


def is_initialized() -> bool:
    """Whether ``torch.distributed`` is available and its default group exists."""
    return dist.is_available() and dist.is_initialized()


def init(backend: Optional[str] = None, timeout: timedelta = timedelta(minutes=5)) -> None:
    """Initialize the default process group, or do nothing if it already exists.

    Args:
        backend: ``"nccl"``, ``"gloo"`` or any backend string torch accepts. ``None`` picks
            NCCL when CUDA is available and Gloo otherwise.
        timeout: finite time after which a collective that some rank never joins raises
            instead of hanging (torch's own default for NCCL can be much longer).

    Rank, world size and rendezvous come from torchrun's environment variables (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). Without them (a plain ``python``
    run) a one-process group is created, so single-process code paths work.
    Under NCCL the current CUDA device is set to ``LOCAL_RANK`` (default: rank modulo the
    device count), which is what one-process-per-GPU launches expect.
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if not isinstance(timeout, timedelta):
        raise TypeError(f"timeout must be a datetime.timedelta, got {type(timeout).__name__}")
    if timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ["RANK"]) if launched else 0
    if "nccl" in backend and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local_rank)
    if launched:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        return
    # Not launched by torchrun: a group of one (its store in this process, no port taken),
    # so the same code runs unlaunched.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def resolve_group(group=None) -> dist.ProcessGroup:
    """The ProcessGroup that ``group`` names (see the module docstring).

    Raises:
        RuntimeError: torch.distributed is not initialized.
        TypeError: ``group`` is none of the accepted types.
        ValueError: a DeviceMesh that is not 1-D, an empty group, or a group this rank is
            not a member of.
    """
    if not is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call pyowt.distributed.init() "
                           "(or torch.distributed.init_process_group) first")
    if group is None:
        return dist.group.WORLD
    if _is_device_mesh(group):
        if group.ndim != 1:
            raise ValueError(f"group: only a 1-D DeviceMesh names one group, got a {group.ndim}-D "
                             f"mesh of shape {tuple(group.shape)}")
        return group.get_group()
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"group: rank {dist.get_rank()} is not a member of this process group "
                         "(torch.distributed.new_group returned GroupMember.NON_GROUP_MEMBER)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError("group must be None, a torch.distributed.ProcessGroup or a 1-D DeviceMesh, "
                        f"got {type(group).__name__}")
    if group.size() < 1:
        raise ValueError(f"group: empty process group (size {group.size()})")
    return group


def _is_device_mesh(obj) -> bool:
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - very old torch
        return False
    return isinstance(obj, DeviceMesh)


def get_world_size(group=None) -> int:
    """K, the number of ranks in ``group``."""
    return dist.get_world_size(resolve_group(group))


def get_rank(group=None) -> int:
    """This process's rank within ``group`` (0..K-1)."""
    return dist.get_rank(resolve_group(group))


def get_backend(group=None) -> str:
    """The backend name of ``group`` (``"gloo"``, ``"nccl"``, ...)."""
    return str(dist.get_backend(resolve_group(group)))


def global_rank(group: dist.ProcessGroup, group_rank: int) -> int:
    """The global rank of ``group_rank`` in ``group`` (what ``torch.distributed`` calls want)."""
    if group is dist.group.WORLD or group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)
