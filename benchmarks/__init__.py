"""Benchmarks of pyowt's ops and strategies, and what they share."""
import contextlib
import os

import torch

# Largest relative L2 error of ours (output and every gradient) against ATen in float64
# before a row's times count: a kernel that is fast and wrong must not show up as a speedup.
ERR_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@contextlib.contextmanager
def environ(name: str, value: str):
    """Set the environment variable ``name`` to ``value`` inside the block, then restore it
    (the C++ ops read some knobs, e.g. PYOWT_CUDA_CONV_TILE, on every call)."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def rel_l2(out, ref) -> float:
    """||out - ref|| / ||ref|| computed in float32 on the tensors' device (the benchmarks'
    correctness gate before timing; the tests' float64 rel_err would copy to the CPU)."""
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
