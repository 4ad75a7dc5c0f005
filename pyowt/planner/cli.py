"""``pyowt plan``: predict data, model, OWT and the searched plan on a described cluster.

Prints a table (strategy, predicted step time, bytes sent per device per step, memory per
device), writes the auto plan as JSON (``--out``), the predictions as JSON (``--results``)
and a figure of the predicted step time against the number of devices, 1..64, per strategy
(``--figure``; matplotlib, Agg backend). ``--batch`` is the batch per device: the global
batch is ``batch * workers`` (weak scaling, as the OWT paper's 128 per GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import math
import sys
from typing import List, Optional

from .specs import DEVICES, DTYPES, LINKS, make_cluster

MODELS = {"small": 32, "alexnet": 224, "vgg16": 224, "resnet50": 224}
DEFAULT_BATCH = {"small": 128, "alexnet": 128, "vgg16": 32, "resnet50": 32}
FIGURE_WORKERS = (1, 2, 4, 8, 16, 32, 64)


def build_model(name: str):
    """The named model (untrained; torchvision models with ``weights=None``)."""
    import torch

    torch.manual_seed(0)
    if name == "small":
        from ..models import AlexNetSmall

        return AlexNetSmall(num_classes=10, in_channels=3)
    if name in ("alexnet", "vgg16", "resnet50"):
        import torchvision

        return getattr(torchvision.models, name)(weights=None)
    raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")


def _positive(kind):
    def parse(s):
        v = kind(s)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {s}")
        return v
    return parse


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to ``pyowt``'s subparsers; returns its parser."""
    s = subparsers.add_parser("plan", help="predict data/model/owt and search an 'auto' plan for a described cluster")
    s.add_argument("--model", default="alexnet", choices=sorted(MODELS))
    s.add_argument("--workers", type=_positive(int), default=8)
    s.add_argument("--device", default="h100", choices=sorted(DEVICES))
    s.add_argument("--interconnect", default="nvlink", choices=sorted(LINKS),
                   help="link between the devices of a node, or (ib/ethernet) the network between nodes")
    s.add_argument("--nodes", type=_positive(int), default=1)
    s.add_argument("--network", default=None, choices=["ib", "ethernet"], help="inter-node link (default ib)")
    s.add_argument("--batch", type=_positive(int), default=None, help="batch per device (global = batch * workers)")
    s.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    s.add_argument("--memory-limit-gb", type=_positive(float), default=None, help="default: the device's memory")
    s.add_argument("--iters", type=_positive(int), default=1500, help="MCMC proposals (per split degree)")
    s.add_argument("--no-hybrids", action="store_true",
                   help="search only plans whose split layers span all workers (no data x split hybrids)")
    s.add_argument("--out", default="plan.json", help="write the auto plan here")
    s.add_argument("--results", default=None, help="write predictions (JSON) here (default: next to --out, "
                                                       "<name>.results.json)")
    s.add_argument("--figure", default=None, help="write the step time vs devices figure (PNG) here (default: "
                                                  "next to --out, <name>.png)")
    s.add_argument("--no-figure", action="store_true", help="skip the figure (it searches at 1..64 devices)")
    s.set_defaults(func=run_plan)
    return s


def _table(rows, out=print):
    out(f"{'strategy':<10} {'step time ms':>13} {'vs data':>8} {'comm MB/step':>13} {'memory GB':>10}  note")
    base = rows[0]["step_time_s"]
    for r in rows:
        t = r["step_time_s"]
        note = "" if r["feasible"] else "over memory limit"
        degrees = sorted({int(c.partition("@")[2]) for c in r.get("configs", ()) if "@" in c})
        if r.get("split_degree"):
            degrees = [r["split_degree"]]
        if degrees:
            groups = "/".join(map(str, degrees))
            note = f"split layers in groups of {groups}" + (f"; {note}" if note else "")
        if not math.isfinite(t):
            out(f"{r['strategy']:<10} {'-':>13} {'-':>8} {'-':>13} {'-':>10}  cannot split a layer over the workers")
            continue
        out(f"{r['strategy']:<10} {t * 1e3:>13.3f} {base / t:>7.2f}x {r['comm_bytes'] / 1e6:>13.1f} "
            f"{r['memory_bytes'] / 1e9:>10.2f}  {note}")


def predict_all(model, name: str, cluster, batch: int, iters: int, memory_limit=None, hybrids: bool = True):
    """(search result, rows) for one cluster: the presets and auto."""
    from .auto import search
    from .capture import capture
    from .costs import CostModel

    k = cluster.workers
    graph = capture(model, (batch * k, 3, MODELS[name], MODELS[name]))
    res = search(graph, CostModel(cluster), k, memory_limit, iters=iters, hybrids=hybrids)
    rows = [res.presets[p].as_dict() for p in ("data", "model", "owt")] + [res.best.as_dict()]
    return res, rows


def _figure(model, name, cluster, batch, iters, memory_limit, path, out=print, hybrids=True):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {s: [] for s in ("data", "model", "owt", "auto")}
    for k in FIGURE_WORKERS:
        _, rows = predict_all(model, name, cluster.with_workers(k), batch, max(100, iters // 4), memory_limit, hybrids)
        for r in rows:
            series[r["strategy"]].append(r["step_time_s"] * 1e3 if math.isfinite(r["step_time_s"]) else float("nan"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for s, ys in series.items():
        ax.plot(FIGURE_WORKERS, ys, marker="o", label=s, linestyle="--" if s == "auto" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("devices")
    ax.set_ylabel("predicted step time (ms)")
    ax.set_title(f"{name}, {batch}/device, {cluster.device.name} {cluster.dtype}, "
                 f"{cluster.intra.name}" + (f" + {cluster.inter.name} across nodes" if cluster.inter else ""),
                 fontsize=9)
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    out(f"figure: {path}")
    return {"workers": list(FIGURE_WORKERS), "step_time_ms": series}


def run_plan(args, out=print) -> int:
    """Handler of ``pyowt plan`` (``args`` from :func:`register`'s parser)."""
    try:  # the flags each parse alone but may not fit together (--nodes must divide --workers)
        cluster = make_cluster(args.device, args.workers, args.interconnect, args.nodes, args.network, args.dtype)
    except ValueError as e:
        print(f"pyowt plan: error: {e} (--device {args.device}, --workers {args.workers}, --nodes {args.nodes}, "
              f"--interconnect {args.interconnect}, --network {args.network})", file=sys.stderr)
        return 2
    batch = args.batch or DEFAULT_BATCH[args.model]
    limit = args.memory_limit_gb * 1e9 if args.memory_limit_gb else None
    model = build_model(args.model)
    res, rows = predict_all(model, args.model, cluster, batch, args.iters, limit, not args.no_hybrids)
    links = cluster.intra.name + (f" within nodes, {cluster.inter.name} across {cluster.nodes} nodes" if cluster.nodes > 1 else "")
    out(f"pyowt plan: {args.model}, {args.workers} x {args.device} ({args.dtype}), {links}, "
        f"batch {batch}/device (global {batch * args.workers}); search {res.search_time:.2f} s, "
        f"{res.evaluations} simulations")
    _table(rows, out)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    res.plan.save(args.out)
    out(f"auto plan: {args.out}")
    stem = args.out[:-5] if args.out.endswith(".json") else args.out
    results_path = args.results or f"{stem}.results.json"
    figure_path = None if args.no_figure else (args.figure or f"{stem}.png")
    results = {"model": args.model, "workers": args.workers, "device": args.device, "interconnect": args.interconnect,
               "nodes": args.nodes, "dtype": args.dtype, "batch_per_device": batch, "search_time_s": res.search_time,
               "strategies": rows, "auto_plan": json.loads(res.plan.to_json())}
    if figure_path:
        results["figure"] = _figure(model, args.model, cluster, batch, args.iters, limit, figure_path, out,
                                    not args.no_hybrids)
    with open(results_path, "w") as f:
        json.dump(results, f, indent=2)
    out(f"results: {results_path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m pyowt.planner.cli ...``: the ``plan`` subcommand on its own."""
    p = argparse.ArgumentParser(prog="pyowt")
    sub = p.add_subparsers(dest="command", required=True)
    register(sub)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
