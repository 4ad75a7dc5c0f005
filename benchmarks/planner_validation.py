"""Predicted against measured step time of data, model, owt (schemes a, b, c), hybrids and auto on K Gloo workers (CPU).

For each K, K processes (one intra-op thread each) capture the model, profile its ops on
this CPU at the same time (so the profile sees the contention of the real run), fit
collective times on the live group, search an auto plan (rank 0's is broadcast), predict
each strategy with the simulator, then train each strategy a few SGD steps and time them
(median step, slowest rank). Where K has a divisor s with 1 < s < K, the hybrids ``model``
and ``owt`` with split degree s (split layers in groups of s, data-parallel across K / s)
are measured too, and collectives are also fitted on groups of each such size. Prints a
table and writes JSON.

    .venv/bin/python benchmarks/planner_validation.py [--workers 2 3 4] [--batch 64] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist


def _model():
    from pyowt.models import AlexNetSmall

    torch.manual_seed(0)
    return AlexNetSmall(num_classes=10, in_channels=3, width=0.25, hidden=512)


def _time_plan(model, plan, batch, size, steps, warmup):
    from pyowt import parallelize

    pmodel = parallelize(model, plan)
    opt = torch.optim.SGD(pmodel.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    times = []
    for i in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        xl, yl = pmodel.local_batch(x, y)
        loss = pmodel.loss(pmodel(xl), yl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends
        if i >= warmup:
            times.append(float(t))
    return statistics.median(times)


def _worker(batch, size, steps, warmup, cache_dir, overlap):
    from pyowt.parallel.plan import Plan, make_plan
    from pyowt.parallel.mesh import Mesh
    from pyowt.planner.auto import Evaluator, search, split_degrees
    from pyowt.planner.capture import capture
    from pyowt.planner.costs import CostModel, Profiler, measure_comm
    from pyowt.planner.specs import DEVICES, LINKS, ClusterSpec

    k, rank = dist.get_world_size(), dist.get_rank()
    model = _model()
    graph = capture(model, (batch, 3, size, size))
    t0 = time.perf_counter()
    fit = measure_comm()
    hybrid_degrees = split_degrees(k)[:-1]
    by_size = {s: measure_comm(Mesh(dist.group.WORLD, s).split_group) for s in hybrid_degrees}
    cluster = ClusterSpec(DEVICES["cpu"], k, LINKS["ethernet"], overlap=overlap)
    cost = CostModel(cluster, Profiler("cpu", cache_dir=cache_dir, context={"concurrent": k}), fit, by_size)
    res = search(graph, cost, k)  # every rank profiles the same ops at the same time
    box = [res.plan.to_json()]
    dist.broadcast_object_list(box, src=0)
    auto = Plan.from_json(box[0])
    search_s = time.perf_counter() - t0
    if rank == 0:
        cost.profiler.save()
    ev = Evaluator(graph, cost, k, overlap=overlap)
    serial = Evaluator(graph, cost, k, overlap=False)  # diagnostic: communication not overlapped
    plans = [(p, make_plan(model, p)) for p in ("data", "model", "owt")]
    plans.append(("auto", auto))
    plans += [(f"owt({s})", make_plan(model, "owt", scheme=s)) for s in ("b", "c")]
    plans += [(f"{p} s={s}", make_plan(model, p, split_degree=s)) for s in hybrid_degrees for p in ("model", "owt")]
    rows = []
    for name, plan in plans:
        configs = tuple(plan.layers[n.name] for n in graph.weight_nodes)
        pred = ev.predict_plan(plan, name)
        pred_serial = serial.predict_plan(plan, name)
        measured = _time_plan(model, plan, batch, size, steps, warmup)
        rows.append({"workers": k, "strategy": name, "split_degree": plan.split_degree,
                     "predicted_ms": pred.time * 1e3, "measured_ms": measured * 1e3,
                     "error": pred.time / measured - 1, "configs": list(configs),
                     "predicted_no_overlap_ms": pred_serial.time * 1e3, "compute_ms": pred.compute * 1e3,
                     "comm_ms": pred.comm * 1e3})
    return {"rows": rows, "fit": fit, "search_s": search_s}


def main(argv=None):
    from pyowt.launch import spawn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-overlap", action="store_true", help="simulate communication on the compute stream")
    p.add_argument("--cache-dir", default=None, help="profile cache (default $PYOWT_CACHE or ~/.cache/pyowt)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows, fits, loads = [], {}, {}
    for k in args.workers:
        before = os.getloadavg()[0]
        out = spawn(_worker, k, args=(args.batch, args.size, args.steps, args.warmup, args.cache_dir,
                                      not args.no_overlap), threads=1)[0]
        rows += out["rows"]
        fits[k] = out["fit"]
        loads[k] = (before, os.getloadavg()[0])  # 1-minute load average before and after this K
        print(f"K={k}: searched in {out['search_s']:.1f} s (incl. profiling); "
              f"all_reduce fit a={out['fit']['all_reduce'][0] * 1e6:.0f} us, "
              f"b={1 / max(out['fit']['all_reduce'][1], 1e-30) / 1e9:.2f} GB/s", flush=True)
    print(f"\n{'K':>2} {'strategy':<11} {'predicted ms':>13} {'measured ms':>12} {'error':>7} {'no-overlap ms':>14} {'error':>7}")
    for r in rows:
        err_s = r["predicted_no_overlap_ms"] / r["measured_ms"] - 1
        print(f"{r['workers']:>2} {r['strategy']:<11} {r['predicted_ms']:>13.1f} {r['measured_ms']:>12.1f} {r['error']:>+7.1%} "
              f"{r['predicted_no_overlap_ms']:>14.1f} {err_s:>+7.1%}")
    med = statistics.median(abs(r["error"]) for r in rows)
    med_s = statistics.median(abs(r["predicted_no_overlap_ms"] / r["measured_ms"] - 1) for r in rows)
    print(f"median |error| {med:.1%} over {len(rows)} runs (without overlap: {med_s:.1%})")
    print("1-minute load average before/after each K: " + ", ".join(f"K={k}: {a:.2f}/{b:.2f}" for k, (a, b) in loads.items()))
    for k in args.workers:
        sub = {r["strategy"]: r for r in rows if r["workers"] == k}
        best = min(("data", "model", "owt"), key=lambda s: sub[s]["predicted_ms"])
        print(f"K={k}: auto (split degree {sub['auto']['split_degree'] or k}) predicted {sub['auto']['predicted_ms']:.1f} ms "
              f"vs best preset {best} "
              f"{sub[best]['predicted_ms']:.1f} ms; measured auto {sub['auto']['measured_ms']:.1f} ms vs "
              f"{best} {sub[best]['measured_ms']:.1f} ms")
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "batch": args.batch, "size": args.size}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "median_abs_error": med, "median_abs_error_no_overlap": med_s,
                       "fits": fits, "load_average": loads}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
