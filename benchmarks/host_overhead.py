"""Per-call host cost of the fused ops against the ATen code they replace.

Tiny tensors, so the kernels cost next to nothing and what is timed is the path around
them: argument checks, backend choice, dispatch, autograd. At AlexNet's FC sizes a GPU
forward+backward is host-bound (benchmarks/RESULTS.md), so this number bounds the ratio
there. Wall clock (the device is synchronized at the end on CUDA), one intra-op thread.

    python -m benchmarks.host_overhead [--device cpu|cuda] [--calls 5000]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def _per_call_us(fn, calls: int, device: torch.device) -> float:
    for _ in range(max(calls // 20, 10)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / calls * 1e6


def _step(fn, mode: str, inputs, grad):
    """One timed call: the forward under no_grad, or forward + ``autograd.grad``."""
    if mode == "fwd":
        with torch.no_grad():
            return fn()
    return torch.autograd.grad(fn(), inputs, grad)


def rows(device: torch.device, calls: int):
    from pyowt.ops import bias_relu, conv2d_bias_act, linear_bias_act
    from pyowt.ops.backend import resolve_backend, unavailable_reason

    def leaf(*shape):
        return torch.randn(*shape, device=device, requires_grad=True)

    x, w, b, gy = leaf(2, 8), leaf(4, 8), leaf(4), torch.randn(2, 4, device=device)
    xc, wc, bc, gc = leaf(1, 2, 5, 5), leaf(3, 2, 3, 3), leaf(3), torch.randn(1, 3, 3, 3, device=device)
    # 2 input channels take the Triton conv's packed RGB walk (its inputs are copied into a
    # 4-channel layout on every call); 8 take the walk of every other layer.
    x8, w8, b8, g8 = leaf(1, 8, 5, 5), leaf(3, 8, 3, 3), leaf(3), torch.randn(1, 3, 3, 3, device=device)
    xb, bb, gb = leaf(2, 3, 4), leaf(3), torch.randn(2, 3, 4, device=device)
    # (label, op, inputs, output gradient, ours(backend), reference)
    cases = [
        ("linear_bias_act", "linear_bias_act", (x, w, b), gy,
         lambda be: (lambda: linear_bias_act(x, w, b, backend=be)), lambda: F.relu(F.linear(x, w, b))),
        ("conv2d_bias_act", "conv2d_bias_act", (xc, wc, bc), gc,
         lambda be: (lambda: conv2d_bias_act(xc, wc, bc, backend=be)), lambda: F.relu(F.conv2d(xc, wc, bc))),
        ("conv2d C_in 8", "conv2d_bias_act", (x8, w8, b8), g8,
         lambda be: (lambda: conv2d_bias_act(x8, w8, b8, backend=be)), lambda: F.relu(F.conv2d(x8, w8, b8))),
        ("bias_relu", "bias_relu", (xb, bb), gb,
         lambda be: (lambda: bias_relu(xb, bb, backend=be)), lambda: torch.relu(xb + bb[None, :, None])),
    ]
    native = "cuda" if device.type == "cuda" else "cpu"
    # On a GPU the Triton kernels too: their launch path is Python (kernels/autotuned.py).
    extra = {"triton"} if device.type == "cuda" and unavailable_reason("triton", device) is None else set()
    for label, name, inputs, grad, ours, ref in cases:
        for be in sorted({native, resolve_backend(name, device)} | extra):
            fn = ours(be)
            for mode in ("fwd", "fwd+bwd"):
                t_ours = _per_call_us(lambda: _step(fn, mode, inputs, grad), calls, device)
                t_ref = _per_call_us(lambda: _step(ref, mode, inputs, grad), calls, device)
                yield label, be, mode, t_ours, t_ref


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--calls", type=int, default=5000)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(1)
    device = torch.device(args.device)
    print(f"host cost per call, {device}, torch {torch.__version__} (ratio = ours / ATen; < 1: ours cheaper)")
    print(f"{'op':<17} {'backend':<7} {'mode':<8} {'ours us':>9} {'ATen us':>9} {'ratio':>7}")
    for name, be, mode, t_ours, t_ref in rows(device, args.calls):
        print(f"{name:<17} {be:<7} {mode:<8} {t_ours:>9.1f} {t_ref:>9.1f} {t_ours / t_ref:>6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
