"""Autograd-aware communication over torch.distributed: groups, layout transitions, accounting.

- :mod:`.groups`: :func:`init` (NCCL on CUDA, Gloo on CPU, torchrun's environment, a
  finite timeout) and what ``group=`` accepts (None = world, ProcessGroup, 1-D DeviceMesh).
- :mod:`.mappings`: one autograd function per layout transition, each backward its dual:
  :func:`all_gather`, :func:`reduce_scatter`, :func:`all_reduce`, :func:`split`,
  :func:`copy_to_group`, :func:`broadcast`, :func:`reduce_to`.
- :mod:`.asynchronous`: ``*_async`` variants returning a :class:`Pending` handle.
- :mod:`.accounting`: ``with comm_stats() as stats:`` counts calls and bytes per kind.
- :func:`set_shape_check`: when ranks exchange shapes so mismatches raise instead of hang.
"""
from ._checks import get_shape_check, set_shape_check
from .accounting import CommStats, KindStats, comm_stats, split_sizes
from .asynchronous import (Pending, all_gather_async, all_reduce_async, all_reduce_inplace,
                           broadcast_async, reduce_scatter_async)
from .groups import get_backend, get_rank, get_world_size, init, is_initialized, resolve_group
from .mappings import (all_gather, all_reduce, broadcast, copy_to_group, reduce_scatter, reduce_to,
                       split)

__all__ = [
    "init", "is_initialized", "resolve_group", "get_rank", "get_world_size", "get_backend",
    "all_gather", "reduce_scatter", "all_reduce", "split", "copy_to_group", "broadcast",
    "reduce_to",
    "Pending", "all_gather_async", "reduce_scatter_async", "all_reduce_async", "broadcast_async",
    "all_reduce_inplace",
    "comm_stats", "CommStats", "KindStats", "split_sizes",
    "set_shape_check", "get_shape_check",
]
