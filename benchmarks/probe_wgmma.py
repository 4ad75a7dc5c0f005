"""Try the CUDA conv's newest tiles (the wgmma tiles, the 128x96x64 WMMA tile) in a
process of their own, before anything relies on them.

    python -m benchmarks.probe_wgmma

The wgmma tiles (csrc/cuda/conv2d_wgmma.cuh) were written and checked (CPU emulation,
SASS) on machines without a Hopper GPU, and first ran on an H100 on 2026-11-27 (every
probe shape agreed). A change to them could still bring a wrong shared-memory descriptor could fault the
device, and a CUDA fault poisons every later call of the process, so
benchmarks/gpu_check.sh runs this first and, unless it passes, sets
PYOWT_CUDA_CONV_WGMMA=0 for the stages after it (the tests then skip the wgmma tiles, the
benchmark leaves them out). The 128x96x64 WMMA tile is tried
first, so that a fault in it shows up here, named, rather than in a later stage; the
first-call timing never picks a tile that disagrees with 128x64x32. Each tile runs a few
conv shapes (AlexNet's conv3 at batch 8, a K tail with several C_out blocks, NCHW and
channels_last output, bf16 and fp16) and is compared with the 128x64x32 WMMA tile and
with a float64 reference.

Exit status: 0 all agree, 1 a mismatch or an error, 2 the tiles cannot run here (no sm_90
GPU or no sm_90a build).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks import environ

TILES = ("128x96x64", "wgmma128x64x64", "wgmma128x96x64", "wgmma128x128x64")
# (N, C_in, H, W, C_out, kernel, stride, padding, channels_last)
SHAPES = [
    (8, 192, 13, 13, 384, 3, 1, 1, True),   # AlexNet conv3
    (3, 24, 11, 9, 200, 3, 2, 1, True),     # K = 216: a partial last K step; 2 C_out blocks
    (2, 64, 15, 15, 130, 5, 1, 2, False),   # NCHW output, C_out tail
]
TOL = 2e-2  # relative L2 error against float64: a 16-bit output's rounding is ~4e-3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def main(op=None, device: str = "cuda") -> int:
    """Runs the probe; ``op`` and ``device`` are for tests of the probe itself (a stand-in
    for torch.ops.pyowt.conv2d_bias_act that reads PYOWT_CUDA_CONV_TILE, on the CPU)."""
    if op is None:
        from pyowt import info
        from pyowt.ops.conv2d import cuda_wgmma_tiles_available

        if not cuda_wgmma_tiles_available():
            print(f"probe_wgmma: the wgmma tiles need an sm_90 GPU and an extension built for sm_90a "
                  f"(GPUs: {info()['devices']}, extension: {info()['extension'].get('compiled')})")
            return 2
        op = torch.ops.pyowt.conv2d_bias_act
    failures = 0
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for n, c, h, w, co, k, stride, pad, cl in SHAPES:
            fmt = torch.channels_last if cl else torch.contiguous_format
            x = torch.randn(n, c, h, w, generator=g).to(device, dtype).contiguous(memory_format=fmt)
            wt = (torch.randn(co, c, k, k, generator=g) / (c * k * k) ** 0.5).to(device, dtype)
            b = torch.randn(co, generator=g).to(device, dtype)
            args = ([stride] * 2, [pad] * 2, [1, 1], 1, "relu")
            ref = F.relu(F.conv2d(x.double(), wt.double(), b.double(), stride, pad))
            with environ("PYOWT_CUDA_CONV_TILE", "128x64x32"):
                base = op(x, wt, b, *args)
            for tile in TILES:
                try:
                    with environ("PYOWT_CUDA_CONV_TILE", tile):
                        out = op(x, wt, b, *args)
                        if out.is_cuda:
                            torch.cuda.synchronize()
                except RuntimeError as e:  # a device fault: nothing after it can run
                    print(f"probe_wgmma: {tile} {dtype} {(n, c, h, w, co, k)}: ERROR {e}")
                    return 1
                err, vs_base = _rel(out, ref), _rel(out, base)
                ok = err < TOL and vs_base < TOL and out.is_contiguous(memory_format=fmt)
                failures += not ok
                print(f"probe_wgmma: {tile:<16} {str(dtype):<15} x {(n, c, h, w)} -> {co} k{k} s{stride} "
                      f"{'NHWC' if cl else 'NCHW'}: rel err {err:.2e} vs float64, {vs_base:.2e} vs "
                      f"128x64x32 {'ok' if ok else 'MISMATCH'}")
    print(f"probe_wgmma: {'all agree' if not failures else f'{failures} mismatches'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
