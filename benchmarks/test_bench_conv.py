"""Benchmark of conv2d_bias_act against ATen (and torch.compile) on AlexNet/ResNet-50 layers.

    pytest benchmarks/test_bench_conv.py -q -s --benchmark-enable   [PYOWT_BENCH_JSON=out.json]

Every test times ours and the references in one interleaved loop (ratios from the same
run, never across runs) and reports ``speedup = t_ref / t_ours`` (> 1: ours is faster)
next to the floor ``max(FLOPs / measured GEMM rate, bytes / measured copy bandwidth)``.

* GPU (skipped without CUDA): batch 128, bf16 (``PYOWT_BENCH_CONV_DTYPES=bfloat16,float16``
  for more), channels_last everywhere, CUDA-event medians of back-to-back calls (and of lone calls,
  "sync ms") with rotating inputs. References:
  ``relu(conv2d(...))`` (cuDNN with torch's default heuristic algorithm choice, "aten"; the
  same with ``torch.backends.cudnn.benchmark = True``, "aten:cudnn-bench", which times
  cuDNN's algorithms on a shape's first call as our CUDA kernel times its tiles: the
  "vs bench" column) and ``torch.compile(mode="max-autotune")`` of the same
  (``PYOWT_BENCH_COMPILE``: ``1`` forward only (default), ``all``, ``0`` none; skipped once
  ``PYOWT_BENCH_BUDGET_S`` seconds (default 100) have passed, to fit the GPU check).
  Ours: the ``triton`` and, when built, the ``cuda`` backend; in 16-bit forward rows also
  the ``cuda`` backend with each tensor-core tile shape forced (``ours:cuda/128x64x32``,
  ``/128x128x32``, ``/128x128x64``, ``/128x96x64``, and on sm_90 with an sm_90a build
  ``/wgmma128x64x64``, ``/wgmma128x96x64``, ``/wgmma128x128x64``), next to its own first-call pick
  (``ours:cuda``; it times the wgmma tiles too unless ``PYOWT_CUDA_CONV_WGMMA=0``, which
  gpu_check.sh sets when its probe fails).
* CPU: batch 8 (224x224 inputs: batch 128 would take minutes per layer on a small CPU),
  float32, NCHW, fastest of the repeats; ours is the ``cpu`` backend (the notes column
  says which forward it ran: ``winograd``, our F(2x2, 3x3) kernel, or ``onednn``, the fused
  post-op), the reference ATen ``relu(conv2d(...))``. Target: geometric mean >= 1.1x
  over the AlexNet layers, forward. TFLOP/s and the floor count a direct convolution's
  FLOPs: Winograd does 2.25x fewer multiplies and can run under that floor.

Before timing, every implementation is checked against ATen in float64 on the same
input (output and, for fwd+bwd, every gradient; relative L2 error of ours at most 2e-2 in
bf16, 1e-2 in fp16, 1e-4 in fp32): the error and the part it is worst in are in the
notes column, ATen's own (in the benchmark's dtype) beside ours for scale; a row of ours
above the bound is marked WRONG (kept in the table, flagged in the summary) and its test
fails after the row is recorded. The first layer of each network runs its backward without an input
gradient, as in training. The table is printed at the end of the module; ``PYOWT_BENCH_JSON=<path>`` also
writes it as JSON.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import pyowt
from benchmarks import ERR_TOL, environ, rel_l2
from pyowt.ops import conv2d_bias_act
from pyowt.ops.backend import unavailable_reason
from pyowt.ops.conv2d import cuda_wgmma_tiles_enabled


@dataclass(frozen=True)
class Layer:
    name: str
    c_in: int
    c_out: int
    size: int
    kernel: int
    stride: int
    padding: int
    first: bool = False  # a network's input layer: no input gradient

    def out_size(self):
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    def flops(self, batch):
        o = self.out_size()
        return 2 * batch * self.c_out * o * o * self.c_in * self.kernel * self.kernel

    def bytes(self, batch, elem):
        o = self.out_size()
        return elem * (batch * self.c_in * self.size ** 2 + batch * self.c_out * o * o
                       + self.c_out * self.c_in * self.kernel ** 2)


ALEXNET = [
    Layer("alexnet.conv1", 3, 64, 224, 11, 4, 2, first=True),
    Layer("alexnet.conv2", 64, 192, 27, 5, 1, 2),
    Layer("alexnet.conv3", 192, 384, 13, 3, 1, 1),
    Layer("alexnet.conv4", 384, 256, 13, 3, 1, 1),
    Layer("alexnet.conv5", 256, 256, 13, 3, 1, 1),
]
RESNET50 = [
    Layer("resnet50.conv1", 3, 64, 224, 7, 2, 3, first=True),
    Layer("resnet50.l1.3x3", 64, 64, 56, 3, 1, 1),
    Layer("resnet50.l2.3x3", 128, 128, 28, 3, 1, 1),
    Layer("resnet50.l3.1x1", 1024, 256, 14, 1, 1, 0),
]
LAYERS = ALEXNET + RESNET50
MODES = ("fwd", "fwd+bwd")
HAS_CUDA = torch.cuda.is_available()
GPU_BATCH, CPU_BATCH = 128, 8
GPU_DTYPES = [getattr(torch, d) for d in
              os.environ.get("PYOWT_BENCH_CONV_DTYPES", "bfloat16").split(",") if d]
# GPU times: back-to-back calls (GPU_INNER per event pair, median of GPU_REPS), the
# device's time per call as in a training step; "sync ms" is a lone call from an idle GPU,
# host launch cost included (what GPU runs before 2026-11-26 17:30 UTC reported as "ms").
GPU_INNER, GPU_REPS = 8, 10
_START = time.perf_counter()
ROWS: list = []


# --- measurement --------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn, device, inner):
    """Seconds per call over ``inner`` back-to-back calls, started on an idle device."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def measure(fns: dict, device, reps: int, warmup: int = 2, stat=statistics.median,
            inner: int = 1) -> dict:
    """Seconds per call of each fn (``stat`` of the repeats: median by default),
    interleaved round by round so that drift hits every fn alike.

    Each repeat times ``inner`` back-to-back calls between two events. With ``inner = 1``
    on a GPU a repeat is one call from an idle device, so its host-side launch cost is in
    the time (the latency of a lone call); with several calls the host queues the next
    while the device runs the last, as in a training step, and the time is the device's
    unless the host is the slower side.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(_time_calls(fn, device, inner))
    return {k: stat(v) for k, v in times.items()}


_PEAKS: dict = {}


def peaks(device, dtype):
    """(GEMM FLOP/s, copy bytes/s) measured here: the floor's denominators."""
    key = (str(device), dtype)
    if key not in _PEAKS:
        n = 8192 if device.type == "cuda" else 2048
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t_mm = measure({"mm": lambda: torch.mm(a, b)}, device, 10)["mm"]
        big = torch.empty(2**28 if device.type == "cuda" else 2**25, dtype=torch.uint8, device=device)
        dst = torch.empty_like(big)
        t_cp = measure({"copy": lambda: dst.copy_(big)}, device, 10)["copy"]
        _PEAKS[key] = (2 * n ** 3 / t_mm, 2 * big.numel() / t_cp)  # copy reads + writes
    return _PEAKS[key]


# --- one layer ----------------------------------------------------------------------------
def _inputs(layer, batch, dtype, device, copies):
    g = torch.Generator(device="cpu").manual_seed(0)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    xs = [torch.randn(batch, layer.c_in, layer.size, layer.size, generator=g).to(device, dtype)
          .contiguous(memory_format=fmt).requires_grad_(not layer.first) for _ in range(copies)]
    w = (torch.randn(layer.c_out, layer.c_in, layer.kernel, layer.kernel, generator=g)
         / math.sqrt(layer.c_in * layer.kernel ** 2)).to(device, dtype)
    if device.type == "cuda":
        w = w.contiguous(memory_format=torch.channels_last)
    b = torch.randn(layer.c_out, generator=g).to(device, dtype)
    return xs, w.requires_grad_(True), b.requires_grad_(True)


CUDNN_BENCH = "aten:cudnn-bench"


def _cudnn_benchmarked(f):
    """``f`` run with ``torch.backends.cudnn.benchmark = True`` (restored after each call)."""
    def run(*args):
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            return f(*args)
        finally:
            torch.backends.cudnn.benchmark = before
    return run


def _callables(impls: dict, layer, xs, w, b, mode):
    """One zero-argument callable per impl; each call takes the next input copy."""
    o = layer.out_size()
    grad = torch.randn(xs[0].shape[0], layer.c_out, o, o, device=w.device, dtype=w.dtype)
    if w.device.type == "cuda":
        grad = grad.contiguous(memory_format=torch.channels_last)
    out = {}
    for name, f in impls.items():
        state = {"i": 0}

        def call(f=f, state=state):
            x = xs[state["i"] % len(xs)]
            state["i"] += 1
            y = f(x, w, b)
            if mode == "fwd+bwd":
                inputs = [w, b] + ([x] if x.requires_grad else [])
                torch.autograd.grad(y, inputs, grad)
            return y

        # cuDNN's benchmark flag around the forward and the backward alike
        out[name] = _cudnn_benchmarked(call) if name == CUDNN_BENCH else call
    return out


def _record(layer, mode, dtype, device, batch, times: dict, ours: str, notes="", latency=None):
    """Adds one row per implementation; ``notes``: one string for all rows, or a dict
    from implementation to its own note; ``latency``: {impl: seconds of a lone call}."""
    rate, bw = peaks(device, dtype)
    mult = 1 if mode == "fwd" else (2 if layer.first else 3)
    elem = torch.finfo(dtype).bits // 8
    floor = max(mult * layer.flops(batch) / rate, mult * layer.bytes(batch, elem) / bw)
    for impl, t in times.items():
        ROWS.append(dict(
            layer=layer.name, mode=mode, dtype=str(dtype).replace("torch.", ""),
            device=device.type, batch=batch, impl=impl, ms=t * 1e3,
            tflops=mult * layer.flops(batch) / t / 1e12, floor_ms=floor * 1e3,
            speedup_vs_aten=times["aten"] / t if "aten" in times else None,
            speedup_vs_compile=(times["compile"] / t if "compile" in times else None),
            speedup_vs_cudnn_bench=(times[CUDNN_BENCH] / t if CUDNN_BENCH in times else None),
            ours=impl == ours or impl.startswith("ours"),
            sync_ms=latency[impl] * 1e3 if latency else None,
            notes=notes.get(impl, "") if isinstance(notes, dict) else notes,
        ))


def _errors(impls: dict, layer, x, w, b, mode) -> dict:
    """{impl: (error, part)}: the largest relative L2 error of each impl's output and
    gradients (``part``: which, "y", "dw", "db" or "dx") against ATen in float64 on the
    same input ``x`` and one random output gradient. ATen in the benchmark's dtype is
    measured too: its error is the scale that ours is judged next to."""
    o = layer.out_size()
    g = torch.Generator(device="cpu").manual_seed(1)
    grad = torch.randn(x.shape[0], layer.c_out, o, o, generator=g).to(w.device, w.dtype)
    if w.device.type == "cuda":
        grad = grad.contiguous(memory_format=torch.channels_last)
    parts = ["y"] + (["dw", "db"] + (["dx"] if x.requires_grad else []) if mode == "fwd+bwd" else [])

    def run(f, x, w, b, grad):
        y = f(x, w, b)
        got = [y.detach()]
        if mode == "fwd+bwd":
            got += torch.autograd.grad(y, [w, b] + ([x] if x.requires_grad else []), grad)
        return got

    f64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, b)]
    ref = run(_conv_ref(layer), *f64, grad.double())
    out = {}
    for name, f in impls.items():
        errs = [rel_l2(a, r) for a, r in zip(run(f, x, w, b, grad), ref)]
        worst = max(range(len(errs)), key=lambda i: errs[i] if errs[i] == errs[i] else math.inf)
        out[name] = (errs[worst], parts[worst])
    return out


def _is_wrong(error, dtype):
    return not error <= ERR_TOL[dtype]  # NaN is wrong


def _error_notes(errors: dict, dtype) -> dict:
    """Notes per impl; a row of ours above the bound is marked WRONG (ATen's is context)."""
    return {name: f"rel err {e:.1e} ({part})"
            + (" WRONG" if name.startswith("ours") and _is_wrong(e, dtype) else "")
            for name, (e, part) in errors.items()}


def _assert_correct(errors: dict, dtype, layer, mode):
    wrong = {name: e for name, e in errors.items() if name.startswith("ours") and _is_wrong(e[0], dtype)}
    assert not wrong, (f"{layer.name} {mode}: relative error above {ERR_TOL[dtype]:g} "
                       f"against float64: {wrong}")


def _conv_ref(layer):
    def ref(x, w, b):
        return F.relu(F.conv2d(x, w, b, layer.stride, layer.padding))
    return ref


def _ours(layer, backend):
    def run(x, w, b):
        return conv2d_bias_act(x, w, b, layer.stride, layer.padding, backend=backend)
    return run


def _ours_cuda_tile(layer, tile):
    """The cuda backend with its tensor-core tile forced (PYOWT_CUDA_CONV_TILE, read per call)."""
    run = _ours(layer, "cuda")

    def forced(x, w, b):
        with environ("PYOWT_CUDA_CONV_TILE", tile):
            return run(x, w, b)
    return forced


def _autotuner_caches():
    """Snapshot of the Triton conv kernels' autotuner caches: {(kernel, key): config}."""
    from pyowt.kernels import conv2d, conv2d_backward
    kernels = {"fwd": conv2d.conv2d_fwd_kernel, "dgrad": conv2d_backward.conv2d_dgrad_kernel,
               "wgrad": conv2d_backward.conv2d_wgrad_kernel}
    return {(name, key): cfg for name, k in kernels.items()
            for key, cfg in getattr(k, "cache", {}).items()}


def _tuned_since(before):
    """The Triton configs the autotuner picked since ``before`` (a snapshot), e.g.
    ``fwd 128x128x32/w8/s3``: which tile each layer ran, for the next tuning round."""
    picked = [f"{name} {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']}"
              f"/w{c.num_warps}/s{c.num_stages}"
              for (name, key), c in _autotuner_caches().items() if (name, key) not in before]
    return ", ".join(picked)


# --- tests --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", LAYERS, ids=[l.name for l in LAYERS])
def test_conv_cpu(benchmark, layer, mode):
    if unavailable_reason("cpu", torch.device("cpu")) is not None:
        pytest.skip("the C++ extension is not built")
    device = torch.device("cpu")
    xs, w, b = _inputs(layer, CPU_BATCH, torch.float32, device, copies=2)
    impls = {"ours:cpu": _ours(layer, "cpu"), "aten": _conv_ref(layer)}
    errors = _errors(impls, layer, xs[0], w, b, mode)
    fns = _callables(impls, layer, xs, w, b, mode)
    # The minimum, not the median: a small shared CPU adds other processes' noise to some
    # repeats, and the fastest repeat is the reproducible cost of each implementation.
    times = measure(fns, device, reps=9 if mode == "fwd" else 5, warmup=1, stat=min)
    from pyowt import _C
    pair = lambda v: [v, v]  # noqa: E731
    algorithm = _C.cpu_conv2d_algorithm(xs[0], w, pair(layer.stride), pair(layer.padding),
                                        pair(1), 1)
    _record(layer, mode, torch.float32, device, CPU_BATCH, times, "ours:cpu",
            notes={"ours:cpu": f"{algorithm}, {_error_notes(errors, torch.float32)['ours:cpu']}"})
    benchmark.extra_info.update(speedup_vs_aten=times["aten"] / times["ours:cpu"],
                                algorithm=algorithm, rel_err=errors["ours:cpu"][0])
    benchmark.pedantic(fns["ours:cpu"], rounds=3, iterations=1)
    _assert_correct(errors, torch.float32, layer, mode)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=[str(d).replace("torch.", "") for d in GPU_DTYPES])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", LAYERS, ids=[l.name for l in LAYERS])
def test_conv_gpu(benchmark, layer, mode, dtype):
    device = torch.device("cuda")
    # Enough input copies that they do not all sit in L2 (50 MB on an H100).
    elem = torch.finfo(dtype).bits // 8
    copies = max(2, min(8, (128 << 20) // (GPU_BATCH * layer.c_in * layer.size ** 2 * elem) + 1))
    xs, w, b = _inputs(layer, GPU_BATCH, dtype, device, copies)
    impls = {"aten": _conv_ref(layer), CUDNN_BENCH: _conv_ref(layer)}  # _callables sets the flag
    backends = [be for be in ("triton", "cuda") if unavailable_reason(be, device) is None]
    tuned_before = _autotuner_caches() if "triton" in backends else {}
    for be in backends:
        impls[f"ours:{be}"] = _ours(layer, be)
    if "cuda" in backends and mode == "fwd" and dtype != torch.float32:
        # each tile shape alone: what the cuda backend's first-call timing chose between
        wgmma = ("wgmma128x64x64", "wgmma128x96x64", "wgmma128x128x64") if cuda_wgmma_tiles_enabled() else ()
        for tile in ("128x64x32", "128x128x32", "128x128x64", "128x96x64") + wgmma:
            impls[f"ours:cuda/{tile}"] = _ours_cuda_tile(layer, tile)
    errors = _errors(impls, layer, xs[0], w, b, mode)  # ours only: before "compile" joins
    extra = ""
    compile_mode = os.environ.get("PYOWT_BENCH_COMPILE", "1")
    budget = float(os.environ.get("PYOWT_BENCH_BUDGET_S", "100"))
    if compile_mode == "all" or (compile_mode == "1" and mode == "fwd"):
        if time.perf_counter() - _START < budget:
            impls["compile"] = torch.compile(_conv_ref(layer), mode="max-autotune", dynamic=False)
        else:
            extra = "compile skipped (time budget)"
    fns = _callables(impls, layer, xs, w, b, mode)
    try:
        times = measure(fns, device, reps=GPU_REPS, warmup=3, inner=GPU_INNER)
    except Exception as e:  # noqa: BLE001 - a failed compile must not hide our numbers
        if "compile" not in fns:
            raise
        extra = f"compile failed: {type(e).__name__}"
        fns.pop("compile")
        times = measure(fns, device, reps=GPU_REPS, warmup=3, inner=GPU_INNER)
    latency = measure(fns, device, reps=GPU_REPS, warmup=0, inner=1)
    ours = "ours:triton" if "ours:triton" in times else f"ours:{backends[0]}"
    error_notes = _error_notes(errors, dtype)
    notes = {impl: "; ".join(n for n in (error_notes.get(impl, ""), extra) if n) for impl in times}
    if "ours:triton" in notes:
        notes["ours:triton"] = "; ".join(n for n in (notes["ours:triton"], _tuned_since(tuned_before)) if n)
    _record(layer, mode, dtype, device, GPU_BATCH, times, ours, notes, latency)
    benchmark.extra_info.update({k: v for k, v in times.items()})
    benchmark.extra_info.update({f"rel_err {k}": e for k, (e, _) in errors.items()})
    benchmark.pedantic(lambda: (fns[ours](), torch.cuda.synchronize()), rounds=5, iterations=1)
    _assert_correct(errors, dtype, layer, mode)


# --- report -------------------------------------------------------------------------------
def _geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summarize(rows):
    """Geometric-mean speedups of each of our impls per (device, dtype, mode, network)."""
    out = {}
    for r in rows:
        if not r["ours"]:
            continue
        net = r["layer"].split(".")[0]
        key = f"{r['device']}/{r['dtype']}/{r['mode']}/{net}/{r['impl']}"
        out.setdefault(key, {"vs_aten": [], "vs_bench": [], "vs_compile": [], "wrong": 0})
        out[key]["vs_aten"].append(r["speedup_vs_aten"])
        out[key]["vs_bench"].append(r.get("speedup_vs_cudnn_bench"))
        out[key]["vs_compile"].append(r["speedup_vs_compile"])
        out[key]["wrong"] += "WRONG" in r["notes"]
    return {k: {m: (v if m == "wrong" else _geomean(v)) for m, v in d.items()} for k, d in out.items()}


def format_table(rows, summary):
    head = (f"{'layer':<18}| {'mode':<8}| {'dtype':<8}| {'impl':<20}| {'ms':>9} | {'TFLOP/s':>8} "
            f"| {'floor ms':>8} | {'vs aten':>7} | {'vs bench':>8} | {'vs compile':>10} | {'sync ms':>8} | notes")
    lines = [head, "-" * len(head)]
    for r in rows:
        va = f"{r['speedup_vs_aten']:.2f}x" if r["speedup_vs_aten"] else "-"
        vb = f"{r['speedup_vs_cudnn_bench']:.2f}x" if r.get("speedup_vs_cudnn_bench") else "-"
        vc = f"{r['speedup_vs_compile']:.2f}x" if r["speedup_vs_compile"] else "-"
        sync = f"{r['sync_ms']:.3f}" if r.get("sync_ms") else "-"
        lines.append(f"{r['layer']:<18}| {r['mode']:<8}| {r['dtype']:<8}| {r['impl']:<20}| "
                     f"{r['ms']:9.3f} | {r['tflops']:8.2f} | {r['floor_ms']:8.3f} | {va:>7} | {vb:>8} | {vc:>10} | "
                     f"{sync:>8} | {r['notes']}")
    lines.append("")
    lines.append("geometric-mean speedup ratio (t_ref / t_ours; > 1 = ours faster):")
    for k, d in sorted(summary.items()):
        va = f"{d['vs_aten']:.3f}x" if d["vs_aten"] else "-"
        vb = f"{d['vs_bench']:.3f}x" if d.get("vs_bench") else "-"
        vc = f"{d['vs_compile']:.3f}x" if d["vs_compile"] else "-"
        bad = f"   ({d['wrong']} row(s) WRONG: not a valid figure)" if d.get("wrong") else ""
        lines.append(f"  {k:<48} vs aten {va:>8}   vs bench {vb:>8}   vs compile {vc:>8}{bad}")
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    if not ROWS:
        return
    summary = summarize(ROWS)
    table = format_table(ROWS, summary)
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print("\n" + table)
    else:
        print("\n" + table)
    path = os.environ.get("PYOWT_BENCH_JSON")
    if path:
        dev = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
        doc = dict(benchmark="conv2d_bias_act", device=dev, torch=torch.__version__,
                   pyowt=pyowt.__version__, cpu_threads=torch.get_num_threads(),
                   peaks={k: {"gemm_flops": v[0], "copy_bytes_per_s": v[1]} for k, v in
                          ((f"{d}/{t}", p) for (d, t), p in _PEAKS.items())},
                   rows=ROWS, summary=summary)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, default=str)
