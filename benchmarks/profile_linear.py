"""Where a linear_bias_act forward+backward spends its time, next to the ATen composition.

For each shape and implementation: wall time per call, the device's busy time per call
(kernel time, from torch.profiler), and the ops with the most host (self CPU) time. A call
whose wall time is well above its kernel time is host-bound, and the host column says
which op to make cheaper. On an H200 most of AlexNet's FC calls were host-bound
(benchmarks/RESULTS.md); this says where that host time goes.

    python -m benchmarks.profile_linear [--device cuda|cpu] [--calls 50] [--top 6]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .host_overhead import _per_call_us

# (name, batch, in_features, out_features): a host-bound and a device-bound AlexNet shape.
SHAPES = [("fc7 b128", 128, 4096, 4096), ("fc6 b1024", 1024, 9216, 4096)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_call(impl, x, w, b, gy):
    from pyowt.ops import linear_bias_act

    if impl == "aten":
        def forward():
            return F.relu(F.linear(x, w, b))
    else:
        def forward():
            return linear_bias_act(x, w, b, backend=impl)
    return lambda: torch.autograd.grad(forward(), (x, w, b), gy)


def profile_one(call, device, calls: int, top: int):
    """(wall us per call, device-busy us per call, [(op, self host us per call)],
    [(kernel, device us per call)]), each list its ``top`` largest."""
    wall = _per_call_us(call, calls, device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        _sync(device)
    events = prof.key_averages()
    kernels = sorted(((e.key, getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / calls)
                      for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA),
                     key=lambda kv: -kv[1])
    busy = sum(us for _, us in kernels)
    host = sorted(((e.key, e.self_cpu_time_total / calls) for e in events), key=lambda kv: -kv[1])
    return wall, busy, host[:top], kernels[:top]


def print_profile(title: str, wall, busy, host, kernels) -> None:
    print(f"{title} wall {wall:8.1f} us/call, device busy {busy:8.1f} us/call")
    for op, us in host:
        print(f"    host {us:7.1f} us  {op}")
    for kernel, us in kernels:
        print(f"    device {us:7.1f} us  {kernel[:110]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--top", type=int, default=6)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    impls = ["aten", "cuda" if device.type == "cuda" else "cpu"]
    print(f"linear_bias_act forward+backward profile, {device}, {dtype}, torch {torch.__version__}")
    for name, m, k, n in SHAPES:
        if device.type == "cpu":
            m = max(m // 16, 8)  # keep the CPU run short
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=g).to(device, dtype).requires_grad_(True)
        w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype).requires_grad_(True)
        b = torch.randn(n, generator=g).to(device, dtype).requires_grad_(True)
        gy = torch.randn(m, n, generator=g).to(device, dtype)
        for impl in impls:
            result = profile_one(_make_call(impl, x, w, b, gy), device, args.calls, args.top)
            print_profile(f"{name} ({m}x{k}->{n}) {impl:<5}", *result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
