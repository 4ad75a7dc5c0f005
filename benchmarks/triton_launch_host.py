"""Host time of the Triton conv forward's eager call on a machine without a GPU.

Everything of Triton's launch path runs (the eager plan, ``JITFunction.run`` with its
binder, specialization and kernel cache, or kernels/relaunch.py) down to the compiled
kernel's launcher, which a stand-in replaces: a stand-in driver (current device and stream,
an sm_90 target) and a stand-in compiled kernel put in Triton's cache instead of compiling.
What is timed is the host's share of a forward and of a forward+backward (data and weight
gradients, the weight gradient's partial sum: four kernels), the part that bounded the
Triton op on an H100 (benchmarks/RESULTS.md); the real launcher (scratch allocation,
argument parsing, ``cuLaunchKernel``) comes on top, the same for both rows. One intra-op
thread.

It must run in a process without ``TRITON_INTERPRET`` (the interpreter replaces
``triton.jit`` when the kernels are imported):

    env -u TRITON_INTERPRET python -m benchmarks.triton_launch_host [--calls 20000]
"""
from __future__ import annotations

import argparse
import os
import time

import torch


class StandInDriver:
    """Triton's active driver without a GPU: device ``device``, stream 1000 + device."""

    def __init__(self):
        self.device = 0

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 1000 + self.device

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True

    def get_benchmarker(self):  # read when an autotuner is created (Triton 3.2/3.3)
        return lambda *args, **kwargs: [0.0]


class RecordingCompiled:
    """A compiled kernel whose launcher records its arguments in ``launches``."""

    function, packed_metadata = "function", "packed"

    def __init__(self, launches: list):
        self.launches = launches

    def launch_metadata(self, grid, stream, *args):
        return "metadata"  # what launch hooks would read

    def run(self, *args):
        self.launches.append(args)


def activate_stand_in_driver() -> StandInDriver:
    """Make a :class:`StandInDriver` Triton's active driver (before the kernels are imported:
    Triton 3.2/3.3 autotuners ask the driver for a benchmarker when they are created)."""
    from triton.runtime import driver

    stand_in = StandInDriver()
    driver.set_active(stand_in)
    return stand_in


def install_stand_ins(autotuned_kernel, record: bool = True):
    """Make the stand-in driver active and Triton's compiler return stand-ins, and give
    ``autotuned_kernel`` one config (its autotuner then launches without timing). Returns
    (driver, launches, compiles): the launcher calls (kept only when ``record``) and the
    compiles. Triton itself puts what it compiles in its cache, in every version."""
    import triton.compiler
    from triton.runtime import driver

    stand_in = driver.active if isinstance(driver.active, StandInDriver) else activate_stand_in_driver()
    launches, compiles = [], []

    class Discarding(list):
        def append(self, item):
            pass

    sink = launches if record else Discarding()

    def compile_stand_in(src, *args, **kwargs):
        compiles.append(src)
        return RecordingCompiled(sink)

    triton.compiler.compile = compile_stand_in  # what JITFunction.create_binder imports
    autotuned_kernel.configs = autotuned_kernel.configs[:1]
    return stand_in, launches, compiles


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--layer", choices=("conv5", "rgb"), default="conv5",
                        help="conv5: AlexNet conv5's geometry; rgb: a 3-channel 11x11 stride-4 first "
                             "layer (the packed walk, which copies x and w on every call)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("run it without TRITON_INTERPRET (env -u TRITON_INTERPRET ...)")
    torch.set_num_threads(1)
    activate_stand_in_driver()
    from pyowt.kernels import conv2d as kconv
    from pyowt.kernels import conv2d_backward as kbwd
    from pyowt.ops import conv2d as conv_mod

    # (the backward's third kernel, the partial sum, is not autotuned: compiling it is
    # stubbed by any of these)
    for kernel in (kconv.conv2d_fwd_kernel, kbwd.conv2d_dgrad_kernel, kbwd.conv2d_wgrad_kernel):
        install_stand_ins(kernel, record=False)
    conv_mod.resolve_backend = lambda op, device, backend=None: "triton"  # CPU tensors

    # AlexNet conv5's geometry at batch 8, or an RGB first layer kept small (the kernels do
    # not run: sizes only matter to the host through the plan's key and the allocations,
    # and the RGB layer's packing copies, which run on this CPU, stay tiny).
    if args.layer == "conv5":
        (n, c, size, co, k, stride, pad), first = (8, 384, 13, 256, 3, 1, 1), False
    else:
        (n, c, size, co, k, stride, pad), first = (2, 3, 31, 64, 11, 4, 2), True
    out_size = (size + 2 * pad - k) // stride + 1
    x = torch.randn(n, c, size, size).contiguous(memory_format=torch.channels_last).requires_grad_(not first)
    w = torch.randn(co, c, k, k).contiguous(memory_format=torch.channels_last).requires_grad_()
    b = torch.randn(co).requires_grad_()
    grad = torch.randn(n, co, out_size, out_size).contiguous(memory_format=torch.channels_last)

    def forward():
        return conv_mod.conv2d_bias_act(x, w, b, stride, pad, backend="triton")

    def forward_backward():
        torch.autograd.grad(forward(), [w, b] if first else [x, w, b], grad)

    def per_call_us(call, calls) -> float:
        for _ in range(max(calls // 50, 10)):
            call()
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - t0) / calls * 1e6

    rows = (("JITFunction.run (PYOWT_TRITON_RELAUNCH=0)", "0"), ("relaunch", "1"))
    for mode, call, calls in (("forward", forward, args.calls), ("forward+backward", forward_backward,
                                                                  max(args.calls // 5, 100))):
        for name, flag in rows + rows:  # twice, alternating: the second pair shows the noise
            os.environ["PYOWT_TRITON_RELAUNCH"] = flag
            conv_mod._EAGER_PLANS.clear()
            print(f"conv2d_bias_act triton eager {args.layer} {mode:<16}, {name:<42} "
                  f"{per_call_us(call, calls):7.2f} us per call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
