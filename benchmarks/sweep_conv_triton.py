"""Block-config sweep of the Triton conv forward against cuDNN, for the next kernel change.

    python -m benchmarks.sweep_conv_triton [--layers alexnet] [--budget-s 90] [--json out.json]

The Triton forward (``kernels/conv2d.py``) autotunes over a handful of configs and reached
only 0.2-0.8x cuDNN's ``relu(conv2d(...))`` on an H200 (benchmarks/RESULTS.md). This times
that kernel, unchanged, under a wider set of tile sizes, K steps, warp counts and pipeline
depths, each config launched directly (no autotuning) and interleaved with cuDNN on the same
inputs (bf16, batch 128, channels_last, CUDA-event medians), so one GPU run shows whether
the gap is the config list or the kernel itself. Prints a table per layer, the best config
of each layer and the geometric mean of the best ratios over the AlexNet layers (the
issue's target metric); a config that does not compile (e.g. out of shared memory) is
reported and skipped. ``--device cpu`` runs the same under ``TRITON_INTERPRET=1`` on tiny
shapes, to keep the script working on machines without a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks import ERR_TOL, rel_l2
from benchmarks.test_bench_conv import ALEXNET, LAYERS, Layer, _inputs, measure

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); GROUP_M = 8 throughout.
CONFIGS = [
    (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),  # the autotuned list
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 64, 64, 4, 3),
    (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),  # Hopper-sized tiles
    (128, 128, 32, 4, 5), (128, 256, 32, 8, 4), (256, 128, 32, 8, 4),
    (128, 64, 64, 4, 5), (64, 128, 64, 4, 5), (256, 64, 64, 8, 4),
    (128, 128, 128, 8, 3), (64, 256, 64, 8, 4), (128, 128, 32, 8, 2),
    (128, 64, 64, 4, 3),  # three blocks per SM: 1.71 waves at AlexNet conv4/conv5
]
CPU_CONFIGS = [(32, 16, 16, 4, 1), (16, 32, 16, 4, 1)]
TINY = [Layer("tiny.3x3", 8, 12, 9, 3, 1, 1), Layer("tiny.rgb5x5", 3, 8, 11, 5, 2, 2, first=True)]


class _FixedConfig:
    """Stands in for ``wrap_triton`` in the launcher: launches the autotuned kernel's
    underlying JIT function with one config's meta-parameters instead of tuning."""

    def __init__(self, config):
        bm, bn, bk, warps, stages = config
        self.meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)

    def __call__(self, autotuned):
        jit = autotuned.fn
        meta = self.meta

        class _Launch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: jit[grid](*args, **kwargs, **meta)

        return _Launch()


def _triton_forward(layer: Layer, launch):
    from pyowt.kernels import conv2d as kconv
    from pyowt.ops.conv2d import _empty_out, conv_shape

    def run(x, w, b):
        shape = conv_shape(x.shape, w.shape, (layer.stride,) * 2, (layer.padding,) * 2, (1, 1), 1)
        out = _empty_out(x, shape)
        kconv.launch_conv2d_fwd(launch, x, w, b, out, shape, True)
        return out

    return run


def _reference(layer: Layer):
    def run(x, w, b):
        return F.relu(F.conv2d(x, w, b, layer.stride, layer.padding))
    return run


def sweep_layer(layer, batch, dtype, device, configs, reps):
    """Rows (config, ms, TFLOP/s, ratio vs the reference) for one layer, plus the reference."""
    xs, w, b = _inputs(layer, batch, dtype, device, copies=2)
    xs = [x.detach().contiguous(memory_format=torch.channels_last) for x in xs]
    w = w.detach().contiguous(memory_format=torch.channels_last)
    b = b.detach()
    ref = _reference(layer)
    want = ref(xs[0], w, b).float()
    rows = []
    for cfg in configs:
        fn = _triton_forward(layer, _FixedConfig(cfg))
        try:
            got = fn(xs[0], w, b).float()
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: report, go on
            rows.append(dict(config=cfg, error=f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
            continue
        err = rel_l2(got, want)

        def rotating(f):
            state = {"i": 0}

            def call():
                state["i"] += 1
                return f(xs[state["i"] % len(xs)], w, b)
            return call

        t = measure({"ours": rotating(fn), "ref": rotating(ref)}, device, reps,
                    inner=8 if device.type == "cuda" else 1)
        rows.append(dict(config=cfg, ms=t["ours"] * 1e3, ref_ms=t["ref"] * 1e3,
                         tflops=layer.flops(batch) / t["ours"] / 1e12, ratio=t["ref"] / t["ours"],
                         rel_err=err))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--layers", default="all", help="'all', 'alexnet', or comma-separated layer names")
    p.add_argument("--budget-s", type=float, default=90.0, help="stop starting new layers after this")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", default=None, help="write every row here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    from pyowt.kernels import HAS_TRITON, interpreter_enabled
    if not HAS_TRITON:
        print("sweep_conv_triton: triton is not installed", file=sys.stderr)
        return 2
    if device.type == "cpu" and not interpreter_enabled():
        print("sweep_conv_triton: --device cpu needs TRITON_INTERPRET=1 set before start", file=sys.stderr)
        return 2
    if device.type == "cuda":
        layers = {"all": [l for l in LAYERS if not l.first] + [l for l in LAYERS if l.first],
                  "alexnet": ALEXNET}.get(args.layers)
        if layers is None:
            by_name = {l.name: l for l in LAYERS}
            layers = [by_name[n] for n in args.layers.split(",")]
        batch, dtype, configs = 128, torch.bfloat16, CONFIGS
    else:
        layers, batch, dtype, configs = TINY, 2, torch.float32, CPU_CONFIGS
    start = time.perf_counter()
    report = []
    for layer in layers:
        if time.perf_counter() - start > args.budget_s:
            print(f"(budget of {args.budget_s:.0f} s spent: {layer.name} and later layers not run)")
            break
        rows = sweep_layer(layer, batch, dtype, device, configs, args.reps)
        print(f"\n{layer.name} (batch {batch}, {str(dtype)[6:]}): reference "
              f"{statistics.median([r['ref_ms'] for r in rows if 'ms' in r] or [math.nan]):.3f} ms")
        for r in rows:
            cfg = "x".join(str(v) for v in r["config"][:3]) + f" w{r['config'][3]} s{r['config'][4]}"
            if "error" in r:
                print(f"  {cfg:<18} {r['error']}")
            else:
                wrong = "" if r["rel_err"] <= ERR_TOL[dtype] else "  WRONG (not a candidate)"
                print(f"  {cfg:<18} {r['ms']:8.3f} ms {r['tflops']:7.1f} TFLOP/s {r['ratio']:6.2f}x  "
                      f"err {r['rel_err']:.1e}{wrong}")
        ok = [r for r in rows if "ms" in r and r["rel_err"] <= ERR_TOL[dtype]]
        if ok:
            best = max(ok, key=lambda r: r["ratio"])
            print(f"  best {best['config']}: {best['ratio']:.2f}x the reference")
        report.append(dict(layer=layer.name, rows=rows, best=best if ok else None))
        sys.stdout.flush()
    alex = [e["best"]["ratio"] for e in report if e["layer"].startswith("alexnet") and e["best"]]
    if alex:
        gm = math.exp(sum(math.log(v) for v in alex) / len(alex))
        print(f"\ngeomean of the best config per AlexNet layer ({len(alex)} layers): {gm:.3f}x cuDNN")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), torch=torch.__version__, layers=report), f, indent=1)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
