"""Launching a compiled Triton kernel again without ``JITFunction.run``.

On every call ``JITFunction.run`` binds and specializes each argument, builds the kernel
cache key and looks the compiled kernel up before it calls the launcher: 13.7 us of host
time per conv forward (39 parameters) on the 2-core dev CPU under Triton 3.8, as much as
the rest of the op's eager path, on kernels that take 80-100 us on an H100 (AlexNet
conv3-5), where the Triton op was host-bound. A caller that launches one problem again and
again (same shapes, strides, scalars, dtypes, constexprs and config; only the tensors'
data changes: the conv's eager plan, pyowt.ops.conv2d) keeps the compiled kernel and calls
its launcher the way ``JITFunction.run`` ends, after checking what would have made Triton
pick another kernel: each pointer's 16-byte alignment, the dtypes, the current device.
Launch hooks (profilers), pre-run hooks and stage-inspection hooks send every call back
through ``JITFunction.run``; without them the launcher gets None for the hooks and their
metadata (Triton >= 3.5 passes its empty hook chains, which call nothing).

The launcher's argument convention changed in Triton 3.3 (all parameters, constexprs
included, in signature order; before: the non-constexpr ones) and its hooks moved to
``triton.knobs`` in 3.4; both are read from the installed Triton
(tests/triton_relaunch_check.py compares with its own ``JITFunction.run``). Under
``TRITON_INTERPRET=1`` there is no compiled kernel and nothing is captured.
``PYOWT_TRITON_RELAUNCH=0`` turns this off.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

try:
    import triton
    from triton.runtime import driver as _driver
except ImportError:  # pragma: no cover - pyowt runs without Triton (CPU backends)
    triton = None


def _triton_version() -> tuple:
    parts = []
    for piece in getattr(triton, "__version__", "0").split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _hooks_source():
    """The object holding the launch hooks Triton's launches pass (``triton.knobs.runtime``
    from 3.4, which also holds the stage-inspection hook; ``CompiledKernel`` before)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime") and hasattr(knobs.runtime, "launch_enter_hook"):
        return knobs.runtime
    from triton.compiler import CompiledKernel
    return CompiledKernel


def _active(hook) -> bool:
    """Whether a launch hook would do anything: Triton >= 3.5 keeps an empty ``HookChain``
    (its ``calls``) where older releases keep None."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _switched_off() -> bool:
    # Read on every relaunch, like pyowt's other variables: setting it takes effect at once.
    return os.environ.get("PYOWT_TRITON_RELAUNCH") == "0"


def _needs_jit(fn, hooks) -> bool:
    """Whether a call must go through ``JITFunction.run``: the switch is off, a launch hook
    would run, or ``fn`` has pre-run hooks, or a stage-inspection hook is set."""
    return (_switched_off() or _active(hooks.launch_enter_hook) or _active(hooks.launch_exit_hook)
            or bool(getattr(fn, "pre_run_hooks", None))
            or getattr(hooks, "add_stages_inspection_hook", None) is not None)


def enabled() -> bool:
    """False under ``PYOWT_TRITON_RELAUNCH=0``, under the interpreter or without Triton."""
    return (triton is not None and not _switched_off()
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


class CompiledLaunch:
    """A compiled kernel bound to one call's grid and non-tensor arguments.

    ``launch(*tensors)`` runs the kernel with ``tensors`` in place of the captured call's
    leading tensor arguments and returns True, or launches nothing and returns False when
    Triton would have specialized the call differently, a hook is set, or the launcher
    refused the arguments once (a warning; the caller then goes through
    ``JITFunction.run``).
    """

    __slots__ = ("_run", "_function", "_packed", "_grid", "_rest", "_aligned", "_dtypes",
                 "_device", "_fn", "_hooks")

    def __init__(self, run, function, packed, grid, rest, aligned, dtypes, device, fn, hooks):
        self._run, self._function, self._packed = run, function, packed
        self._grid, self._rest = grid, rest
        self._aligned, self._dtypes, self._device = aligned, dtypes, device
        self._fn, self._hooks = fn, hooks

    @classmethod
    def capture(cls, fn, compiled, args: tuple, kwargs: dict, num_tensors: int) -> Optional["CompiledLaunch"]:
        """The relaunch of ``fn.run(*args, **kwargs)`` (``kwargs`` with ``grid`` and
        ``warmup``), whose return value was ``compiled``, or None when it cannot be kept:
        relaunching off, no compiled kernel (the interpreter), the first ``num_tensors``
        arguments not all tensors or a later one a tensor, a parameter without a value."""
        if not enabled() or compiled is None:
            return None
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            return None
        tensors = args[:num_tensors]
        if len(tensors) != num_tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            return None
        params = fn.params
        values = list(args)
        for p in params[len(args):]:
            if p.name in kwargs:
                values.append(kwargs[p.name])
            elif p.has_default:
                values.append(p.default)
            else:
                return None
        if len(values) != len(params) or any(isinstance(v, torch.Tensor) for v in values[num_tensors:]):
            return None
        if _triton_version() < (3, 3):
            values = [v for v, p in zip(values, params) if not p.is_constexpr]
        grid = tuple(kwargs["grid"])
        if callable(kwargs["grid"]) or not 1 <= len(grid) <= 3:
            return None
        grid = grid + (1,) * (3 - len(grid))
        aligned = tuple(t.data_ptr() % 16 == 0 for t in tensors)
        dtypes = tuple(t.dtype for t in tensors)
        device = _driver.active.get_current_device()
        return cls(compiled.run, compiled.function, compiled.packed_metadata, grid,
                   tuple(values[num_tensors:]), aligned, dtypes, device, fn, _hooks_source())

    def __call__(self, *tensors: torch.Tensor) -> bool:
        run = self._run
        if run is None or _needs_jit(self._fn, self._hooks):
            return False
        aligned, dtypes = self._aligned, self._dtypes
        if len(tensors) != len(aligned):
            return False
        for i, t in enumerate(tensors):
            if (t.data_ptr() % 16 == 0) != aligned[i] or t.dtype != dtypes[i]:
                return False
        device = _driver.active.get_current_device()
        if device != self._device:
            return False
        g = self._grid
        try:
            run(g[0], g[1], g[2], _driver.active.get_current_stream(device), self._function, self._packed,
                None, None, None, *tensors, *self._rest)
        except TypeError as error:
            # The launcher parses its arguments before launching: a Triton whose launcher
            # takes others than this module expects for its version lands here, not on the GPU.
            self._run = None
            warnings.warn(f"pyowt: relaunching a compiled Triton kernel failed ({error}); its calls go "
                          f"through Triton's JITFunction.run from now on (PYOWT_TRITON_RELAUNCH=0 skips "
                          f"the attempt)", RuntimeWarning, stacklevel=2)
            return False
        return True
