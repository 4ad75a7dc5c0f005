"""Whether a model runs on an image size, found without running it."""
from __future__ import annotations

import copy
from typing import Optional

import torch


def image_size_problem(model: torch.nn.Module, in_channels: int, size: int) -> Optional[str]:
    """The first line of the error a forward of ``model`` on (2, ``in_channels``, ``size``,
    ``size``) images raises, or None when it runs (or cannot be checked: an op without a
    meta kernel). A forward on the meta device: shapes only, no memory, no arithmetic."""
    try:
        m = copy.deepcopy(model).to("meta")
        with torch.no_grad():
            m(torch.empty(2, in_channels, size, size, device="meta"))
    except (RuntimeError, ValueError) as e:
        return str(e).strip().splitlines()[0]
    except NotImplementedError:  # an op without a meta kernel: the real forward will tell
        pass
    return None
