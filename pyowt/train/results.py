"""Writing a run's results: a JSON file (strict JSON: NaN becomes null) and a PNG figure."""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(data: dict, path: str) -> str:
    """Write ``data`` to ``path`` atomically (a reader never sees half a file)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(_clean(data), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def write_results(results: dict, json_path: Optional[str], plot_path: Optional[str]) -> List[str]:
    """The JSON and/or the training figure (see :func:`pyowt.plots.plot_training`); the paths written."""
    written = []
    if json_path:
        written.append(write_json(results, json_path))
    if plot_path:
        from ..plots import plot_training

        written.append(plot_training(results, plot_path))
    return written
