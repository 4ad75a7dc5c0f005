"""Launching ``@triton.autotune`` kernels with less host time once a shape is tuned."""

# (autotuned kernel, launcher's key) -> the triton.Config its autotuner picked.
_PICKED: dict = {}


def launch_autotuned(launch, kernel, key: tuple, grid, *args, **kwargs) -> None:
    """``launch(kernel)[grid](*args, **kwargs)`` for an autotuned ``kernel``.

    ``launch`` is ``wrap_triton`` (inside a registered op), a stand-in that tests and the
    sweep pass, or None: eager mode. Then the first call with a ``key`` goes through the
    autotuner and later ones straight to the JIT function with the config it picked.
    Triton's ``Autotuner.run`` rebuilds a dict of every argument on each call: ~9 us of
    the ~26 us that the conv forward's launcher spent on the 2-core dev CPU, on ops whose
    H100 kernels take ~80 us. ``key`` must determine the autotuner's own key (its key
    arguments' values and the tensor arguments' dtypes).
    """
    if launch is not None:
        launch(kernel)[grid](*args, **kwargs)
        return
    config = _PICKED.get((kernel, key))
    if config is None:
        kernel[grid](*args, **kwargs)
        _PICKED[(kernel, key)] = kernel.best_config
    else:
        kernel.fn[grid](*args, **kwargs, **config.all_kwargs())
