"""Training throughput of the strategies against the single process and torch's DDP.

The OWT paper's problem on a small machine: torchvision's AlexNet (61.1M parameters) at
64x64 input, global batch 64, on 2 Gloo workers with one thread each. DDP all-reduces all
61M gradients every step; pyowt's owt keeps the 58.6M FC weights sharded and moves only
activations for them. All runs happen in one invocation so the ratios compare like with like:

    python -m benchmarks.strategies [--steps 8] [--json out.json]

Each configuration trains ``steps`` SGD steps after 2 warm-up steps on the same synthetic
batches; images/s is the global batch over the median step time (rank 0).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pyowt.launch import spawn

WARMUP = 2


def _model(seed=0):
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.alexnet(weights=None, num_classes=1000)


def _batches(n, batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g))
            for _ in range(n)]


def _timed(step_fn, batches):
    times = []
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        step_fn(x, y)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_single(steps, batch, size, threads):
    torch.set_num_threads(threads)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / _timed(step, _batches(steps + WARMUP, batch, size))


def _ddp_worker(steps, batch, size):
    from torch.nn.parallel import DistributedDataParallel

    k, rank = dist.get_world_size(), dist.get_rank()
    model = DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x, y):
        xl, yl = x.tensor_split(k)[rank], y.tensor_split(k)[rank]
        loss = F.cross_entropy(model(xl), yl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / _timed(step, _batches(steps + WARMUP, batch, size))


def _pyowt_worker(preset, options, steps, batch, size):
    from pyowt import parallelize

    pmodel = parallelize(_model(), preset, **options)
    opt = torch.optim.SGD(pmodel.parameters(), lr=0.01, momentum=0.9)

    def step(x, y):
        xl, yl = pmodel.local_batch(x, y)
        loss = pmodel.loss(pmodel(xl), yl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / _timed(step, _batches(steps + WARMUP, batch, size))


CONFIGS = [("data", {}), ("model", {}), ("owt", {"scheme": "a"}), ("owt", {"scheme": "b"})]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    k = args.workers
    print(f"torchvision alexnet, {args.size}x{args.size}, global batch {args.batch}, {args.steps} timed steps; "
          f"{k} Gloo workers x 1 thread vs 1 process x {k} threads", flush=True)
    rows = {"single": run_single(args.steps, args.batch, args.size, threads=k)}
    print(f"  single: {rows['single']:.1f} images/s", flush=True)
    rows["ddp"] = spawn(_ddp_worker, k, args=(args.steps, args.batch, args.size), threads=1)[0]
    print(f"  ddp: {rows['ddp']:.1f} images/s", flush=True)
    for preset, options in CONFIGS:
        name = preset if not options else f"{preset}({options['scheme']})"
        rows[name] = spawn(_pyowt_worker, k, args=(preset, options, args.steps, args.batch, args.size), threads=1)[0]
        print(f"  {name}: {rows[name]:.1f} images/s", flush=True)
    print(f"\n{'config':<10} {'images/s':>9} {'vs single':>10} {'vs DDP':>8}")
    for name, rate in rows.items():
        print(f"{name:<10} {rate:9.1f} {rate / rows['single']:9.2f}x {rate / rows['ddp']:7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "images_per_s": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
