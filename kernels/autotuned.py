"""Launching ``@triton.autotune`` kernels with less host time once a shape is tuned."""

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
    None while ``key`` is not tuned. A caller that launches the same problem again and
    again may keep them (see launch_conv2d_fwd's ``memo``)."""
    picked = _PICKED.get((kernel, key))
    if picked is None:
        return None
    config, config_kwargs = picked
    return {"grid": grid(config.kwargs), "warmup": False, **kwargs, **config_kwargs}
