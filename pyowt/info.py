"""``pyowt.info()``: what this installation was built with and what it will run."""
from __future__ import annotations

import platform
from typing import Any, Dict

import torch

from . import _extension
from .kernels import HAS_TRITON, TRITON_VERSION, interpreter_enabled


def _nccl_version():
    try:
        if torch.cuda.is_available() or torch.version.cuda:
            v = torch.cuda.nccl.version()
            return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception:  # noqa: BLE001 - torch without NCCL
        return None
    return None


def info() -> Dict[str, Any]:
    """A dict describing versions, the compiled extension and each op's backend here.

    Keys: ``pyowt``, ``python``, ``torch``, ``torch_cuda``, ``triton``, ``cuda_available``,
    ``devices``, ``nccl``, ``gloo``, ``extension`` (loaded, reason, build info: torch it was
    built for, CUDA archs, nvcc, compiler), ``triton_interpreter`` and ``ops`` (op name ->
    backend chosen for CPU and for CUDA tensors on this machine).
    """
    from . import __version__
    from .ops.backend import registered_ops, resolve_backend

    status = _extension.STATUS
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    ops = {}
    for name in sorted(registered_ops()):
        ops[name] = {"cpu": resolve_backend(name, torch.device("cpu"))}
        ops[name]["cuda"] = resolve_backend(name, torch.device("cuda")) if torch.cuda.is_available() else None
    return {
        "pyowt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": TRITON_VERSION if HAS_TRITON else None,
        "triton_interpreter": interpreter_enabled(),
        "cuda_available": torch.cuda.is_available(),
        "devices": devices,
        "nccl": _nccl_version(),
        "gloo": torch.distributed.is_available() and torch.distributed.is_gloo_available(),
        "extension": {
            "loaded": status.loaded,
            "reason": status.reason,
            "with_cuda": status.with_cuda,
            "build": status.build_info,
            "compiled": status.build_config,
        },
        "ops": ops,
    }
