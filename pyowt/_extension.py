"""Loading of the compiled extension ``pyowt._C``, with a fallback when it is unusable.

The extension registers the C++/CUDA operators (``torch.ops.pyowt.*``) as a side effect of
being imported. It is refused, with one warning, when it is missing, when it was built for
another torch (its C++ ABI would not match: loading it could crash on a missing symbol), or
when ``PYOWT_DISABLE_EXTENSION=1``. pyowt then runs every op on its Triton or ATen path.
"""
from __future__ import annotations

import importlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

_BUILD_INFO_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")


@dataclass
class ExtensionStatus:
    """What happened when pyowt tried to load ``pyowt._C``."""

    loaded: bool
    reason: str
    build_info: dict = field(default_factory=dict)
    build_config: dict = field(default_factory=dict)
    module: Optional[Any] = None

    @property
    def with_cuda(self) -> bool:
        return self.loaded and bool(self.build_config.get("with_cuda"))


def _read_build_info(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # a torn or hand-edited file: treat as unknown
        return {"_error": f"{path}: {e}"}


def _base_version(v: str) -> str:
    return v.split("+")[0]


def load_extension(build_info_path: str = _BUILD_INFO_FILE) -> ExtensionStatus:
    """Try to import ``pyowt._C``; never raises. Returns what happened and why."""
    if os.environ.get("PYOWT_DISABLE_EXTENSION", "0") not in ("", "0"):
        return ExtensionStatus(False, "disabled by PYOWT_DISABLE_EXTENSION")
    info = _read_build_info(build_info_path)
    built_for = info.get("torch")
    if built_for is not None and (
        _base_version(built_for) != _base_version(torch.__version__)
        or (info.get("torch_cuda") or None) != (torch.version.cuda or None)
    ):
        return ExtensionStatus(
            False,
            f"pyowt._C was built for torch {built_for} (CUDA {info.get('torch_cuda')}) but torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}) is installed; rebuild with "
            "`pip install --no-build-isolation -e .`",
            build_info=info,
        )
    try:
        module = importlib.import_module("pyowt._C")
    except ImportError as e:
        return ExtensionStatus(False, f"pyowt._C could not be imported: {e}", build_info=info)
    try:
        config = dict(module.build_config())
    except Exception as e:  # noqa: BLE001 - an extension from another pyowt version
        return ExtensionStatus(False, f"pyowt._C is not this pyowt's extension: {e}", build_info=info)
    return ExtensionStatus(True, "loaded", build_info=info, build_config=config, module=module)


STATUS = load_extension()
if not STATUS.loaded:
    warnings.warn(
        f"pyowt: running without the compiled extension ({STATUS.reason}); "
        "ops fall back to their Triton or ATen implementations.",
        RuntimeWarning,
        stacklevel=2,
    )
