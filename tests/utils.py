"""Numerical helpers shared by the tests, and how they run Triton outside the interpreter."""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# ||out - ref|| / ||ref|| bounds by compute dtype, against a float64 reference.
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of ``out`` against ``ref`` (computed in float64); NaN never passes."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    return num / denom if denom > 0 else num


def assert_close_rel(out, ref, dtype, what="output", tol=None):
    tol = REL_TOL[dtype] if tol is None else tol
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} ({dtype})"


@contextlib.contextmanager
def fp32_precision(tf32: bool):
    """Run cuDNN convolutions and cuBLAS matmuls on float32 in TF32 (``tf32=True``) or in
    full precision, then restore the previous settings.

    From torch 2.9 the per-operator flags (``torch.backends.cudnn.conv.fp32_precision``)
    are what convolutions read; the legacy ``allow_tf32`` setters do not reliably reach
    them, and reading a legacy flag while conv and rnn disagree raises. So set conv, rnn
    and matmul together through the new API when it exists, the legacy flags before.
    """
    cudnn = torch.backends.cudnn
    value = "tf32" if tf32 else "ieee"
    if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        targets = [cudnn.conv, cudnn.rnn, torch.backends.cuda.matmul]
        saved = [t.fp32_precision for t in targets]
        for t in targets:
            t.fp32_precision = value
        try:
            yield
        finally:
            for t, v in zip(targets, saved):
                t.fp32_precision = v
    else:
        saved = cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            yield
        finally:
            cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def recorded_torch_functions():
    """A ``__torch_function__`` mode for the block; yields the list of functions it saw."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Record():
        yield seen


def record_calls(monkeypatch, module, *names):
    """Wrap each of ``module``'s callables ``names`` (those not None) so that every call
    appends to the returned list, then runs the original."""
    calls = []
    for name in names:
        real = getattr(module, name)
        if real is not None:
            monkeypatch.setattr(module, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    return calls


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with ``n`` intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def triton_nvidia_backend() -> bool:
    """Whether the installed Triton can compile for NVIDIA GPUs (without one, too)."""
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


def run_without_interpreter(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m module *args`` from the repository root in a process without
    ``TRITON_INTERPRET`` or ``PYOWT_TRITON_RELAUNCH``: scripts that compile Triton kernels for
    real or run its launch path (the interpreter replaces ``triton.jit`` at import)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYOWT_TRITON_RELAUNCH")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
