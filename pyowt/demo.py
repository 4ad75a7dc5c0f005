"""``pyowt demo``: a short, real data-parallel training run on local Gloo workers.

Trains :class:`pyowt.models.AlexNetSmall` on scikit-learn's handwritten digits with K
workers, each on its shard of every global batch, gradients averaged across workers, and
reports loss, held-out accuracy and images/s. Everything runs on the CPU.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import digits_dataset
from .launch import spawn
from .models import AlexNetSmall

GLOBAL_BATCH = 64


def _train(steps: int, seed: int):
    rank, k = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    train, val = digits_dataset(size=32, seed=seed)
    model = AlexNetSmall(num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x_all, y_all = train.tensors
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(y_all), (GLOBAL_BATCH,), generator=g)
        mine = idx.tensor_split(k)[rank]
        loss = F.cross_entropy(model(x_all[mine]), y_all[mine], reduction="sum") / GLOBAL_BATCH
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        total = loss.detach().clone()
        dist.all_reduce(total)
        opt.step()
        losses.append(total.item())
        if rank == 0 and (step + 1) % 10 == 0:
            rate = (step + 1) * GLOBAL_BATCH / (time.perf_counter() - t0)
            print(f"step {step + 1:4d}/{steps}  loss {total.item():.4f}  {rate:7.1f} images/s", flush=True)
    elapsed = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        xv, yv = val.tensors
        correct = (model(xv).argmax(1) == yv).sum().item()
    return {"losses": losses, "accuracy": correct / len(yv), "images_per_s": steps * GLOBAL_BATCH / elapsed}


def run_demo(workers: int = 2, steps: int = 150, seed: int = 0) -> int:
    """Train for ``steps`` SGD steps on ``workers`` Gloo processes; print a summary."""
    if workers < 1 or steps < 1:
        raise SystemExit(f"--workers and --steps must be >= 1, got {workers} and {steps}")
    print(f"pyowt demo: AlexNetSmall on digits (32x32), {workers} Gloo workers, global batch {GLOBAL_BATCH}, {steps} steps")
    results = spawn(_train, workers, args=(steps, seed))
    r = results[0]
    print(f"final loss {r['losses'][-1]:.4f} (first {r['losses'][0]:.4f}); "
          f"held-out accuracy {100 * r['accuracy']:.1f}%; {r['images_per_s']:.1f} images/s")
    return 0
