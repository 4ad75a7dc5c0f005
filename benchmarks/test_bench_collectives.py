"""All-gather and reduce-scatter: pyowt's autograd wrappers next to the raw torch.distributed calls.

    pytest benchmarks/test_bench_collectives.py -q -s --benchmark-enable   [PYOWT_BENCH_JSON=out.json]

The benchmark spawns its own K worker processes (it does not use the test suite's pools).
Message size S follows nccl-tests: the gathered output of an all-gather, the (unreduced)
input of a reduce-scatter. ``algbw = S / t``, ``busbw = algbw * (K-1)/K``. For each size,
in one run and interleaved (raw block, ours block, ..., repeated in rotating order; the
fastest block counts, which filters out interference from other processes on the machine):

* ``raw``: ``torch.empty`` of the output + ``dist.all_gather_single`` /
  ``reduce_scatter_single`` (``*_into_tensor`` / ``*_tensor`` on torch < 2.13), i.e. the
  plain call that returns a fresh tensor, as the wrapper does;
* ``ours``: ``pyowt.distributed.all_gather(x, 0, sizes=...)`` / ``reduce_scatter(x, 0)`` on
  a tensor that requires grad (so the autograd node is built too), forward only;
* ``ours+exch``: ``all_gather`` without ``sizes``: includes the shape exchange (one small
  extra all-gather) that finds the per-rank sizes.

The table's ``ours/raw`` is the wrapper's cost (target: <= 1.05 at >= 1 MB); ``raw/pre``
compares raw with a preallocated output (the nccl-tests way) to show what the allocation
itself costs. Time per block is the slowest rank's. A last line gives the wrapper's host
time per call with the collective stubbed out (free of network noise, which on a small,
shared machine is far larger than the wrapper's cost).

* CPU: Gloo, K = 2 (``PYOWT_BENCH_K``), sizes 4 KB .. 64 MB (``PYOWT_BENCH_MAX_MB``): on a
  small machine 256 MB buffers times K processes times repeats take minutes and memory.
* CUDA: NCCL with K = the number of GPUs (at least 2), 4 KB .. 256 MB, CUDA-synchronized
  blocks. With fewer than 2 GPUs the NCCL part is skipped (K = 1 moves nothing).
"""
from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyowt.launch import join_loopback_group, loopback_store

_ROWS: list = []


def _raw_fns():
    ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return ag, rs


def _block(fn, iters, sync, group):
    """Mean seconds per call over ``iters`` calls, slowest rank, all ranks started together."""
    sync()
    dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
    return elapsed.item() / iters


def _sweep(rank, k, port, backend, sizes, reps, queue):
    import pyowt.distributed as pd

    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        sync = torch.cuda.synchronize
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        sync = lambda: None  # noqa: E731
    join_loopback_group(backend, port, rank, k, 300.0)  # the parent's store
    # Barriers and timing reductions run on a CPU (Gloo) group; the backend under test
    # carries only the measured traffic.
    timing = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    ag_raw, rs_raw = _raw_fns()
    rows = []
    try:
        for size in sizes:
            n = size // 4 // k                       # fp32 elements per rank's piece
            piece = torch.randn(n, device=device, requires_grad=True)
            full = torch.randn(n * k, device=device, requires_grad=True)
            out_full, out_piece = torch.empty(n * k, device=device), torch.empty(n, device=device)
            with torch.no_grad():
                p_, f_ = piece.detach(), full.detach()
            fns = {
                "all_gather": {
                    "raw": lambda: ag_raw(torch.empty(n * k, device=device), p_),
                    "pre": lambda: ag_raw(out_full, p_),
                    "ours": lambda: pd.all_gather(piece, 0, sizes=[n] * k),
                    "ours+exch": lambda: pd.all_gather(piece, 0),
                },
                "reduce_scatter": {
                    "raw": lambda: rs_raw(torch.empty(n, device=device), f_),
                    "pre": lambda: rs_raw(out_piece, f_),
                    "ours": lambda: pd.reduce_scatter(full, 0),
                },
            }
            # ~0.15 s per block on a slow link, at least 3 and at most 200 calls.
            iters = max(3, min(200, (8 << 20) // max(size, 1)))
            for op, variants in fns.items():
                for fn in variants.values():  # warm-up: allocator, connections
                    fn()
                times = {name: [] for name in variants}
                names = list(variants)
                for rep in range(reps):
                    # Rotate the order every repeat so no variant always runs first.
                    for name in names[rep % len(names):] + names[:rep % len(names)]:
                        times[name].append(_block(variants[name], iters, sync, timing))
                med = {name: min(v) for name, v in times.items()}
                rows.append({"backend": backend, "K": k, "op": op, "bytes": n * k * 4,
                             **{f"t_{name}": t for name, t in med.items()}})
        rows.append(_wrapper_overhead(pd, k, device))
    finally:
        if rank == 0:
            queue.put(rows)
        dist.destroy_process_group()


def _wrapper_overhead(pd, k, device):
    """Host time per call of ours and of the raw call with the collective itself stubbed out
    (on every rank, so nothing is sent): the wrapper's own cost, free of network noise."""
    from pyowt.distributed import _compat

    saved = _compat._ALL_GATHER, _compat._REDUCE_SCATTER
    _compat._ALL_GATHER = lambda out, t, group=None, async_op=False: None
    _compat._REDUCE_SCATTER = lambda out, t, op=None, group=None, async_op=False: None
    piece = torch.randn(256, device=device, requires_grad=True)
    full = torch.randn(256 * k, device=device, requires_grad=True)
    p_ = piece.detach()
    variants = {"raw": lambda: _compat._ALL_GATHER(torch.empty(256 * k, device=device), p_),
                "ours_ag": lambda: pd.all_gather(piece, 0, sizes=[256] * k),
                "ours_rs": lambda: pd.reduce_scatter(full, 0)}
    out = {}
    try:
        for name, fn in variants.items():
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(1000):
                    fn()
                best = min(best, (time.perf_counter() - t0) / 1000)
            out[name] = best
    finally:
        _compat._ALL_GATHER, _compat._REDUCE_SCATTER = saved
    return {"op": "overhead", "K": k, **{f"t_{n}": t for n, t in out.items()}}


def _run(backend, k, sizes, reps):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = loopback_store(300.0)  # held until the workers are done
    procs = [ctx.Process(target=_sweep, args=(r, k, store.port, backend, sizes, reps, queue)) for r in range(k)]
    for p in procs:
        p.start()
    try:
        rows = queue.get(timeout=900)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return rows


def _fmt_size(b):
    return f"{b / 2**20:g} MB" if b >= 2**20 else f"{b / 2**10:g} KB"


def _report(rows):
    lines = [f"{'size':>9} {'op':>14} {'K':>2} | {'raw us':>10} {'algbw':>7} {'busbw':>7} | "
             f"{'ours us':>10} {'algbw':>7} {'busbw':>7} | {'raw/pre':>7} {'+exch/raw':>9} {'ours/raw':>9}"]
    for r in rows:
        if r["op"] == "overhead":
            continue
        k, s = r["K"], r["bytes"]
        bw = lambda t: s / t / 1e9  # noqa: E731  (GB/s)
        exch = f"{r['t_ours+exch'] / r['t_raw']:9.3f}" if "t_ours+exch" in r else f"{'-':>9}"
        lines.append(f"{_fmt_size(s):>9} {r['op']:>14} {k:>2} | {r['t_raw'] * 1e6:10.1f} {bw(r['t_raw']):7.3f} "
                     f"{bw(r['t_raw']) * (k - 1) / k:7.3f} | {r['t_ours'] * 1e6:10.1f} {bw(r['t_ours']):7.3f} "
                     f"{bw(r['t_ours']) * (k - 1) / k:7.3f} | {r['t_raw'] / r['t_pre']:7.3f} {exch} "
                     f"{r['t_ours'] / r['t_raw']:8.3f}x")
    big = [r["t_ours"] / r["t_raw"] for r in rows if r["op"] != "overhead" and r["bytes"] >= 2**20]
    for r in rows:
        if r["op"] == "overhead":
            lines.append(f"host time per call, collective stubbed (no network; cf. the ratio columns): "
                         f"all_gather {r['t_ours_ag'] * 1e6:.1f} us, reduce_scatter {r['t_ours_rs'] * 1e6:.1f} us, "
                         f"raw call {r['t_raw'] * 1e6:.1f} us")
    if big:
        lines.append(f"ratio ours/raw at >= 1 MB: max {max(big):.3f}, median {statistics.median(big):.3f} "
                     "(target <= 1.05); algbw/busbw in GB/s")
    print("\n" + "\n".join(lines))
    _ROWS.extend(rows)
    path = os.environ.get("PYOWT_BENCH_JSON")
    if path:
        with open(path, "w") as f:
            json.dump({"benchmark": "pyowt.distributed collectives vs raw torch.distributed",
                       "ratio": "t_ours / t_raw", "rows": _ROWS}, f, indent=1)
    return big


def _sizes(max_bytes):
    out, s = [], 4 << 10
    while s <= max_bytes:
        out.append(s)
        s *= 4
    return out


def test_bench_collectives_gloo(benchmark):
    k = int(os.environ.get("PYOWT_BENCH_K", "2"))
    max_mb = float(os.environ.get("PYOWT_BENCH_MAX_MB", "64"))
    reps = int(os.environ.get("PYOWT_BENCH_REPS", "7"))
    rows = benchmark.pedantic(_run, args=("gloo", k, _sizes(int(max_mb * 2**20)), reps), rounds=1, iterations=1)
    big = _report(rows)
    benchmark.extra_info["ours_over_raw_max_at_1MB_plus"] = max(big) if big else None
    assert all(r["t_raw"] > 0 for r in rows)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL timing needs at least 2 GPUs (K = 1 moves nothing)")
def test_bench_collectives_nccl(benchmark):
    k = min(torch.cuda.device_count(), 8)
    reps = int(os.environ.get("PYOWT_BENCH_REPS", "7"))
    rows = benchmark.pedantic(_run, args=("nccl", k, _sizes(256 << 20), reps), rounds=1, iterations=1)
    big = _report(rows)
    benchmark.extra_info["ours_over_raw_max_at_1MB_plus"] = max(big) if big else None
