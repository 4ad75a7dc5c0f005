"""Launching Triton kernels (autotuned or not) with less host time once a problem is known.

Two levels. :func:`launch_autotuned`: once an autotuned kernel is tuned for a key, later
calls skip its autotuner. A memo (a dict an eager caller keeps for one problem: calls whose
arguments match in all but the tensors' data) goes further: :func:`launch_and_remember`
keeps the launch's scalar and keyword arguments there, and :func:`launch_from_memo` later
passes only the tensors, first through ``JITFunction.run`` and from then on by relaunching
the compiled kernel it returned (kernels.relaunch).
"""
from __future__ import annotations

from .relaunch import CompiledLaunch

try:
    from triton.runtime.autotuner import Autotuner
except ImportError:  # pragma: no cover - the kernels need Triton anyway
    Autotuner = ()

# (autotuned kernel, launcher's key) -> (the triton.Config its autotuner picked, that
# config's launch keyword arguments).
_PICKED: dict = {}


def launch_autotuned(launch, kernel, key: tuple, grid, *args, **kwargs) -> None:
    """``launch(kernel)[grid](*args, **kwargs)`` for an autotuned ``kernel``.

    ``launch`` is ``wrap_triton`` (inside a registered op), a stand-in that tests and the
    sweep pass, or None: eager mode. Then the first call with a ``key`` goes through the
    autotuner and later ones straight to the JIT function with the config it picked.
    Triton's ``Autotuner.run`` rebuilds a dict of every argument on each call: ~9 us of
    the ~26 us that the conv forward's launcher spent on the 2-core dev CPU, on ops whose
    H100 kernels take ~80 us. ``key`` must determine the autotuner's own key (its key
    arguments' values and the tensor arguments' dtypes). ``grid(meta)`` may read only the
    config's meta-parameters (BLOCK_M, ...): once tuned it is evaluated on them directly.
    """
    if launch is not None:
        launch(kernel)[grid](*args, **kwargs)
        return
    run_kwargs = tuned_run_kwargs(kernel, key, grid, kwargs)
    if run_kwargs is None:
        kernel[grid](*args, **kwargs)
        _PICKED[(kernel, key)] = (kernel.best_config, kernel.best_config.all_kwargs())
    else:
        kernel.fn.run(*args, **run_kwargs)


def tuned_run_kwargs(kernel, key: tuple, grid, kwargs: dict):
    """The keyword arguments with which ``kernel.fn.run(*args, **them)`` launches ``kernel``
    in the config its autotuner picked for ``key`` (grid evaluated, ``kwargs`` merged), or
    None while ``key`` is not tuned."""
    picked = _PICKED.get((kernel, key))
    if picked is None:
        return None
    config, config_kwargs = picked
    return {"grid": grid(config.kwargs), "warmup": False, **kwargs, **config_kwargs}


def launch_and_remember(launch, memo, kernel, key, grid, tensors: tuple, scalars: tuple, kwargs: dict) -> None:
    """``launch(kernel)[grid](*tensors, *scalars, **kwargs)``, then, for an eager call
    (``launch`` None) with a ``memo``, keep there what :func:`launch_from_memo` needs.

    ``kernel``: an autotuned kernel (``key`` as in :func:`launch_autotuned`, ``grid`` a
    function of the config's meta-parameters; nothing is kept until it is tuned) or a
    ``triton.jit`` function (``key`` unused, ``grid`` a tuple; ``kwargs`` may hold
    ``num_warps``). ``tensors`` are the leading arguments, the only ones that may change
    between the calls that share ``memo``.
    """
    if isinstance(kernel, Autotuner):
        launch_autotuned(launch, kernel, key, grid, *tensors, *scalars, **kwargs)
        run_kwargs = tuned_run_kwargs(kernel, key, grid, kwargs) if memo is not None and launch is None else None
    else:
        (kernel if launch is None else launch(kernel))[grid](*tensors, *scalars, **kwargs)
        run_kwargs = {"grid": tuple(grid), "warmup": False, **kwargs}
    if memo is not None and launch is None and run_kwargs is not None:
        memo["launch"] = (scalars, run_kwargs)


class LaunchMemos:
    """Eager launch memos by key (a launch geometry: sizes, strides, dtypes, flags, device),
    for launchers without a caller-kept plan; cleared when ``limit`` keys are held (a network
    repeats a few)."""

    def __init__(self, limit: int = 1024):
        self._memos: dict = {}
        self.limit = limit

    def for_launch(self, launch, key: tuple):
        """The memo of ``key`` for an eager launch; None for a traced one (``launch`` given)."""
        if launch is not None:
            return None
        memo = self._memos.get(key)
        if memo is None:
            if len(self._memos) >= self.limit:
                self._memos.clear()
            memo = self._memos[key] = {}
        return memo

    def __len__(self) -> int:
        return len(self._memos)

    def clear(self) -> None:
        self._memos.clear()


def launch_from_memo(memo, kernel, tensors: tuple) -> bool:
    """Launch ``kernel`` on ``tensors`` from what :func:`launch_and_remember` kept in
    ``memo`` and return True, or launch nothing and return False (nothing kept yet).

    The first such launch goes through ``JITFunction.run`` and keeps the compiled kernel it
    returns (or False where kernels.relaunch cannot); later ones relaunch it, and go back
    through ``JITFunction.run`` whenever the relaunch declines (alignment, hooks, ...).
    """
    if not memo:
        return False
    relaunch = memo.get("relaunch")
    if relaunch and relaunch(*tensors):
        return True
    scalars, run_kwargs = memo["launch"]
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    compiled = fn.run(*tensors, *scalars, **run_kwargs)
    if relaunch is None:
        memo["relaunch"] = CompiledLaunch.capture(fn, compiled, tuple(tensors) + tuple(scalars), run_kwargs,
                                                  num_tensors=len(tensors)) or False
    return True
