"""Where a conv2d_bias_act forward+backward spends its time, per backend, next to cuDNN.

For AlexNet conv2, conv3 and conv5 (batch 128, channels_last; bf16 on a GPU): wall time
per call, the device's busy time per call, the ops with the most host time and the kernels
with the most device time (torch.profiler). On an H100 the Triton backend's
forward+backward took 2.4-4.2x cuDNN's time at conv2-conv5 while its forward kernel alone
ran at 0.86-1.13x cuDNN's speed (benchmarks/RESULTS.md); this says which kernel (input gradient, weight
gradient, its split-K sum, the casts) or which host step takes it.

    python -m benchmarks.profile_conv [--device cuda|cpu] [--calls 20] [--top 6] [--layers conv3]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .profile_linear import print_profile, profile_one

# name: (C_in, C_out, kernel, stride, padding, H = W of the input)
LAYERS = {
    "conv2": (64, 192, 5, 1, 2, 27),
    "conv3": (192, 384, 3, 1, 1, 13),
    "conv5": (256, 256, 3, 1, 1, 13),
}


def _make_call(impl, x, w, b, gy, stride, padding):
    from pyowt.ops import conv2d_bias_act

    if impl == "aten":
        def forward():
            return F.relu(F.conv2d(x, w, b, stride, padding))
    else:
        def forward():
            return conv2d_bias_act(x, w, b, stride, padding, backend=impl)
    return lambda: torch.autograd.grad(forward(), (x, w, b), gy)


def main(argv=None) -> int:
    from pyowt.ops.backend import unavailable_reason

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--top", type=int, default=6)
    p.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated, of {', '.join(LAYERS)}")
    p.add_argument("--batch", type=int, default=None, help="default 128 on a GPU, 2 on the CPU")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    unknown = [name for name in layers if name not in LAYERS]
    if unknown or not layers:
        p.error(f"--layers: expected names from {', '.join(LAYERS)}, got {args.layers!r}")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = args.batch or (128 if device.type == "cuda" else 2)
    if batch < 1:
        p.error(f"--batch must be >= 1, got {batch}")
    # (Triton under the CPU interpreter would take minutes and time nothing real.)
    backends = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    impls = ["aten"] + [be for be in backends if unavailable_reason(be, device) is None]
    print(f"conv2d_bias_act forward+backward profile, {device}, {dtype}, batch {batch}, torch {torch.__version__}")
    for name in layers:
        c_in, c_out, k, stride, padding, hw = LAYERS[name]
        g = torch.Generator().manual_seed(0)
        fmt = torch.channels_last
        x = torch.randn(batch, c_in, hw, hw, generator=g).to(device, dtype).contiguous(memory_format=fmt)
        w = (torch.randn(c_out, c_in, k, k, generator=g) / (c_in * k * k) ** 0.5).to(device, dtype)
        w = w.contiguous(memory_format=fmt)
        b = torch.randn(c_out, generator=g).to(device, dtype)
        for t in (x, w, b):
            t.requires_grad_(True)
        h_out = (hw + 2 * padding - k) // stride + 1
        gy = torch.randn(batch, c_out, h_out, h_out, generator=g).to(device, dtype).contiguous(memory_format=fmt)
        for impl in impls:
            call = _make_call(impl, x, w, b, gy, stride, padding)
            call()  # tunes / compiles outside the timed calls
            print_profile(f"{name} {impl:<6}", *profile_one(call, device, args.calls, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
