"""``pyowt compare``: train one model with each strategy on K workers and compare.

For every strategy: images/s, bytes communicated per iteration per worker (measured with
:func:`pyowt.distributed.comm_stats`), peak memory, the loss after N steps and its difference
from the single-process run on the same global batches (which it must match: the strategies
change where the arithmetic happens, not what it computes).
"""
from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import distributed as pdist
from .launch import spawn
from .models import AlexNetSmall
from .models.shapes import image_size_problem

DEFAULT_STRATEGIES = ("data", "model", "owt")


@dataclass
class StrategyResult:
    strategy: str
    workers: int
    images_per_s: float
    comm_bytes_per_iter: int
    comm_calls_per_iter: Dict[str, int]
    peak_rss_mb: float
    # Parameters + gradients + optimizer state held by one worker (its shards), in MB.
    state_mb: float = 0.0
    losses: List[float] = field(default_factory=list)
    max_loss_diff: Optional[float] = None
    # Leading steps whose loss is within AGREE_TOL of the single process's.
    steps_agreeing: Optional[int] = None


# The parallel runs compute the single process's math in another summation order; training
# amplifies the rounding differences step by step (chaotically, once the loss leaves its
# plateau), so agreement is judged on the leading steps.
AGREE_TOL = 1e-4


def _leading_within(a: Sequence[float], b: Sequence[float], tol: float) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if abs(x - y) > tol:
            return i
    return min(len(a), len(b))


def build_model(name: str, num_classes: int, in_channels: int, seed: int) -> torch.nn.Module:
    """``small`` (AlexNetSmall) or ``alexnet`` (torchvision's), seeded."""
    torch.manual_seed(seed)
    if name == "small":
        return AlexNetSmall(num_classes=num_classes, in_channels=in_channels)
    if name == "alexnet":
        import torchvision

        m = torchvision.models.alexnet(weights=None, num_classes=num_classes)
        if in_channels != 3:
            m.features[0] = torch.nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2)
        return m
    raise ValueError(f"model must be 'small' or 'alexnet', got {name!r}")


def _batches(data: str, steps: int, batch: int, size: int, seed: int):
    """The same global batches on every process: digits (real) or synthetic images."""
    g = torch.Generator().manual_seed(seed)
    if data == "digits":
        from .data import digits_dataset

        train, _ = digits_dataset(size=size, seed=seed)
        x_all, y_all = train.tensors
        for _ in range(steps):
            idx = torch.randint(0, len(y_all), (batch,), generator=g)
            yield x_all[idx], y_all[idx]
    elif data == "synthetic":
        for _ in range(steps):
            yield torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)
    else:
        raise ValueError(f"data must be 'digits' or 'synthetic', got {data!r}")


def _state_mb(params, optimizer) -> float:
    """Bytes of parameters, their gradients and the optimizer's per-parameter tensors."""
    total = 0
    for p in params:
        total += p.numel() * p.element_size() * (2 if p.grad is not None else 1)
        total += sum(v.numel() * v.element_size() for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v))
    return total / 1e6


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _single_process(model_name, data, steps, batch, size, seed, lr):
    from .parallel import seeded_dropout_copy

    in_ch = 1 if data == "digits" else 3
    model = seeded_dropout_copy(build_model(model_name, 10, in_ch, seed), seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses, t0 = [], None
    for i, (x, y) in enumerate(_batches(data, steps, batch, size, seed)):
        if i == 1:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    rate = (steps - 1) * batch / (time.perf_counter() - t0) if steps > 1 else float("nan")
    return StrategyResult("single", 1, rate, 0, {}, _peak_rss_mb(), _state_mb(model.parameters(), opt), losses)


def _worker(strategy, model_name, data, steps, batch, size, seed, lr):
    from .parallel import parallelize

    in_ch = 1 if data == "digits" else 3
    pmodel = parallelize(build_model(model_name, 10, in_ch, seed), strategy, seed=seed)
    opt = torch.optim.SGD(pmodel.parameters(), lr=lr, momentum=0.9)
    losses, t0, stats = [], None, None
    for i, (x, y) in enumerate(_batches(data, steps, batch, size, seed)):
        if i == 1:
            t0 = time.perf_counter()
        with pdist.comm_stats() as s:
            xl, yl = pmodel.local_batch(x, y)
            loss = pmodel.loss(pmodel(xl), yl)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if i == 0:
            stats = s
        losses.append(loss.item())
    rate = (steps - 1) * batch / (time.perf_counter() - t0) if steps > 1 else float("nan")
    sent = stats.total_sent - stats["shape_exchange"].sent
    calls = {k: v for k, v in stats.calls.items() if k != "shape_exchange" and v}
    return StrategyResult(pmodel.plan.name, pdist.get_world_size(), rate, sent, calls, _peak_rss_mb(),
                          _state_mb(pmodel.parameters(), opt), losses)


class CompareArgumentError(ValueError):
    """An argument :func:`compare` cannot run with; ``param`` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message


def check_compare_args(model: str, strategies: Sequence[str], workers: int, steps: int, batch: int,
                       data: str, size: int, lr: float) -> None:
    """Raise :class:`CompareArgumentError` for what :func:`compare` cannot run, before any
    step runs or any worker starts: the model or data unknown, counts out of range, images
    too small for the model, a strategy that is neither a preset nor a plan file that fits
    the model."""
    if model not in ("small", "alexnet"):
        raise CompareArgumentError("model", f"must be 'small' or 'alexnet', got {model!r}")
    if data not in ("digits", "synthetic"):
        raise CompareArgumentError("data", f"must be 'digits' or 'synthetic', got {data!r}")
    if workers < 1:
        raise CompareArgumentError("workers", f"must be >= 1, got {workers}")
    if batch < workers:
        raise CompareArgumentError("batch", f"must be at least the number of workers ({workers}), got {batch}")
    if steps < 2:
        raise CompareArgumentError("steps", f"must be >= 2 (the first is a warm-up), got {steps}")
    if not lr > 0:
        raise CompareArgumentError("lr", f"must be > 0, got {lr}")
    if data == "digits" and size < 8:
        raise CompareArgumentError("size", f"must be >= 8 for the 8x8 digits, got {size}")
    if not strategies:
        raise CompareArgumentError("strategies", "name at least one strategy")
    in_ch = 1 if data == "digits" else 3
    net = build_model(model, 10, in_ch, seed=0)
    problem = image_size_problem(net, in_ch, size)
    if problem is not None:
        raise CompareArgumentError("size", f"model {model!r} cannot run on {size}x{size} images ({problem})")
    from .parallel.plan import resolve_plan, validate_plan

    for strategy in strategies:
        try:
            validate_plan(resolve_plan(net, strategy), net)
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise CompareArgumentError("strategies", f"{strategy!r}: {e}") from e


def compare(model: str = "small", strategies: Sequence[str] = DEFAULT_STRATEGIES, workers: int = 2,
            steps: int = 20, batch: int = 64, data: str = "digits", size: int = 32, seed: int = 0,
            lr: float = 0.05, json_path: Optional[str] = None, out=print) -> List[StrategyResult]:
    """Train ``model`` ``steps`` steps with each strategy on ``workers`` Gloo processes.

    Returns one :class:`StrategyResult` per strategy after the single-process reference
    (first). ``images_per_s`` is measured over steps 2..N (step 1 warms up) on rank 0; the
    communication is that of one iteration on rank 0. Bad arguments raise
    :class:`CompareArgumentError` (a ValueError) before anything runs.
    """
    check_compare_args(model, strategies, workers, steps, batch, data, size, lr)
    out(f"pyowt compare: {model} on {data} ({size}x{size}), global batch {batch}, {steps} SGD steps, "
        f"{workers} Gloo workers")
    results = [_single_process(model, data, steps, batch, size, seed, lr)]
    out(f"  single process done: {results[0].images_per_s:.1f} images/s")
    for strategy in strategies:
        r = spawn(_worker, workers, args=(strategy, model, data, steps, batch, size, seed, lr))[0]
        r.max_loss_diff = max(abs(a - b) for a, b in zip(r.losses, results[0].losses))
        r.steps_agreeing = _leading_within(r.losses, results[0].losses, AGREE_TOL)
        results.append(r)
        out(f"  {r.strategy} done: {r.images_per_s:.1f} images/s")
    out("")
    out(f"{'strategy':<12} {'images/s':>9} {'vs single':>9} {'comm MB/iter':>13} {'state MB':>9} {'peak RSS MB':>12} "
        f"{'final loss':>11} {'max |dloss|':>12} {'steps within 1e-4':>18}")
    base = results[0].images_per_s
    for r in results:
        diff = "-" if r.max_loss_diff is None else f"{r.max_loss_diff:.2e}"
        agree = "-" if r.steps_agreeing is None else f"{r.steps_agreeing}/{len(r.losses)}"
        out(f"{r.strategy:<12} {r.images_per_s:9.1f} {r.images_per_s / base:8.2f}x {r.comm_bytes_per_iter / 1e6:13.3f} "
            f"{r.state_mb:9.2f} {r.peak_rss_mb:12.0f} {r.losses[-1]:11.4f} {diff:>12} {agree:>18}")
    if any(r.steps_agreeing is not None and r.steps_agreeing < len(r.losses) for r in results):
        out("dloss: the loss minus the single process's at the same step. Each strategy sums in its own "
            "order and training amplifies the rounding differences over the steps, so long runs drift "
            "apart; 'steps within 1e-4' counts the leading steps that agree.")
    if json_path:
        summary = {"model": model, "data": data, "batch": batch, "steps": steps, "workers": workers,
                   "results": [asdict(r) for r in results]}
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=2)
        out(f"results written to {json_path}")
        png = os.path.splitext(json_path)[0] + ".png"
        try:
            from .plots import plot_compare

            out(f"figure written to {plot_compare(summary, png)}")
        except ImportError as e:  # matplotlib is optional: the JSON and the table stand alone
            out(f"no figure: {e}")
    return results
