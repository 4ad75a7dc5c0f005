"""Figures people look at: strategy comparison, predicted scaling, training curves (PNG).

matplotlib (an optional dependency: ``pip install pyowt[demo]``) runs on its file-only Agg
backend, so figures are written on machines without a display. Every function takes plain
dicts (what the JSON results hold) and a path, and returns the path.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Mapping, Optional

_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("figures need matplotlib: pip install matplotlib (or pyowt[demo])") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_compare(data: Mapping, path: str) -> str:
    """Bar charts of ``pyowt compare`` results: throughput and communication per strategy.

    ``data``: the compare JSON (``model``, ``data``, ``batch``, ``workers``, ``results``: a
    list of dicts with ``strategy``, ``images_per_s``, ``comm_bytes_per_iter``).
    """
    plt = _plt()
    rows = list(data["results"])
    names = [r["strategy"] for r in rows]
    rate = [r["images_per_s"] for r in rows]
    comm = [r["comm_bytes_per_iter"] / 1e6 for r in rows]
    colors = [_COLORS[i % len(_COLORS)] for i in range(len(rows))]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.6 * len(rows) + 2.6))
    y = list(range(len(rows)))[::-1]
    ax1.barh(y, rate, color=colors)
    base = rate[0] if rows and rows[0]["strategy"] == "single" and rate[0] > 0 else None
    for yi, v in zip(y, rate):
        label = f"{v:,.0f}" + (f"  ({v / base:.2f}x)" if base else "")
        ax1.text(v, yi, " " + label, va="center", fontsize=9)
    ax1.set_yticks(y, names)
    ax1.set_xlabel("training throughput (images/s, higher is better)")
    ax1.set_title("Throughput" + ("  (x: vs single process)" if base else ""))
    ax1.set_xlim(0, max(rate + [1e-9]) * 1.35)
    ax2.barh(y, comm, color=colors)
    for yi, v in zip(y, comm):
        ax2.text(v, yi, f" {v:,.3f} MB", va="center", fontsize=9)
    ax2.set_yticks(y, names)
    ax2.set_xlabel("communication per iteration per worker (MB, lower is better)")
    ax2.set_title("Communication")
    ax2.set_xlim(0, max(comm + [1e-9]) * 1.35)
    for ax in (ax1, ax2):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"pyowt compare: {data.get('model', '?')} on {data.get('data', '?')}, "
                 f"{data.get('workers', '?')} workers, global batch {data.get('batch', '?')}")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_scaling(results: Mapping[str, Mapping[int, float]], path: str, title: Optional[str] = None) -> str:
    """The planner's predicted scaling: step time and speedup against the number of devices.

    ``results``: ``{strategy: {devices: predicted step time in seconds}}`` (devices 1..64,
    say). The speedup is relative to the fastest strategy at the smallest device count
    present, so the panels compare strategies with each other, not each with itself.
    """
    plt = _plt()
    if not results:
        raise ValueError("results is empty: expected {strategy: {devices: step_time_s}}")
    series = {}
    for name, by_dev in results.items():
        pts = sorted((int(d), float(t)) for d, t in by_dev.items())
        if not pts or any(d < 1 or not (t > 0 and math.isfinite(t)) for d, t in pts):
            raise ValueError(f"results[{name!r}]: expected devices >= 1 and positive finite times, got {dict(by_dev)}")
        series[name] = pts
    d0 = min(p[0][0] for p in series.values())
    base = min(t for pts in series.values() for d, t in pts if d == d0)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    all_devs = sorted({d for pts in series.values() for d, _ in pts})
    for i, (name, pts) in enumerate(series.items()):
        c = _COLORS[i % len(_COLORS)]
        ds, ts = zip(*pts)
        ax1.plot(ds, [t * 1e3 for t in ts], "o-", color=c, label=name)
        ax2.plot(ds, [base / t for t in ts], "o-", color=c, label=name)
    ax2.plot(all_devs, [d / d0 for d in all_devs], "--", color="gray", label="linear (ideal)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_devs, [str(d) for d in all_devs])
        ax.set_xlabel("devices")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax1.set_ylabel("predicted time per step (ms, log scale)")
    ax1.set_title("Predicted step time (lower is better)")
    ax2.set_yscale("log", base=2)
    ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax2.yaxis.set_minor_formatter(NullFormatter())
    ax2.set_ylabel(f"speedup vs best at {d0} device{'s' if d0 > 1 else ''} (x)")
    ax2.set_title("Predicted speedup (higher is better)")
    fig.suptitle(title or "pyowt plan: predicted scaling per strategy")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def _smooth(values, window: int):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_training(results: Mapping, path: str) -> str:
    """Curves of a ``pyowt train`` run: loss per step, validation accuracy and throughput per epoch."""
    plt = _plt()
    hist, cfg, meta = results["history"], results.get("config", {}), results.get("meta", {})
    losses, epochs = hist.get("loss", []), hist.get("epochs", [])
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    steps = list(range(1, len(losses) + 1))
    if losses:
        w = max(1, len(losses) // 50)
        if w > 1:
            ax1.plot(steps, losses, color=_COLORS[0], alpha=0.3, lw=0.8, label="train (per step)")
            ax1.plot(steps, _smooth(losses, w), color=_COLORS[0], lw=1.6, label=f"train (mean of {w} steps)")
        else:
            ax1.plot(steps, losses, color=_COLORS[0], lw=1.2, label="train (per step)")
    if epochs:
        ax1.plot([e["global_step"] for e in epochs], [e["val_loss"] for e in epochs], "o-", color=_COLORS[1],
                 label="validation")
        ax2.plot([e["epoch"] for e in epochs], [100 * e["val_acc"] for e in epochs], "o-", color=_COLORS[2])
        for e in epochs[-1:]:
            ax2.annotate(f"{100 * e['val_acc']:.1f}%", (e["epoch"], 100 * e["val_acc"]),
                         textcoords="offset points", xytext=(0, -14), ha="center", fontsize=9)
        ax3.bar([e["epoch"] for e in epochs], [e["images_per_s"] for e in epochs], color=_COLORS[3])
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy loss")
    ax1.set_title("Loss")
    ax1.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax2, ax3):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation accuracy (%)")
    ax2.set_ylim(0, 100)
    ax2.set_title("Validation accuracy")
    ax3.set_xlabel("epoch")
    ax3.set_ylabel("training throughput (images/s)")
    ax3.set_title("Throughput")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    fig.suptitle(f"pyowt train: {cfg.get('model', '?')} on {cfg.get('data', '?')}, strategy "
                 f"{meta.get('plan', cfg.get('strategy', '?'))}, K={meta.get('world_size', '?')} "
                 f"({meta.get('device', '?')}), global batch {cfg.get('batch_size', '?')}")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def scaling_from_json(data: Dict) -> Dict[str, Dict[int, float]]:
    """``{strategy: {devices: seconds}}`` from JSON, whose object keys are strings."""
    return {s: {int(d): float(t) for d, t in v.items()} for s, v in data.items()}
