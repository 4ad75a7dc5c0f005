"""What `pyowt train`'s Ctrl-C agreement costs per step (pyowt.train.interrupt.StopRequest).

    python -m benchmarks.stop_request_cost [--steps 400] [--blocks 5] [--step-ms 2.5]

K = 2 Gloo workers run a stand-in training step (matrix products for about ``--step-ms``
plus one small all-reduce, the step's own collective) in blocks of ``--steps`` steps, in
rotating order per mode; the fastest block of each mode counts (it filters out the other
jobs of a shared machine). Modes:

* ``none``: no polling (the reference);
* ``poll``: ``StopRequest.poll()`` every step, as the training loop calls it (the flags are
  reduced about every ``POLL_PERIOD_S``);
* ``every``: a synchronous flag all-reduce on every step, what polling without the
  schedule would cost.

Prints microseconds per step and each mode's ratio to ``none`` measured in the same run.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from pyowt.launch import spawn
from pyowt.train.interrupt import StopRequest

MODES = ("none", "poll", "every")


def _calibrate(a: torch.Tensor, step_ms: float) -> int:
    t0 = time.perf_counter()
    for _ in range(20):
        torch.tanh(a @ a)
    per = (time.perf_counter() - t0) / 20
    n = max(1, round(step_ms / 1e3 / per))
    t = torch.tensor([float(n)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the same work on both ranks
    return int(t.item())


def _step(a: torch.Tensor, matmuls: int, collective: torch.Tensor) -> None:
    b = a
    for _ in range(matmuls):
        b = torch.tanh(b @ a)
    dist.all_reduce(collective)


def _worker(steps: int, blocks: int, step_ms: float):
    torch.manual_seed(0)
    a = torch.randn(256, 256) / 16
    matmuls = _calibrate(a, step_ms)
    collective = torch.zeros(1)
    best = {m: float("inf") for m in MODES}
    for block in range(blocks):
        order = MODES[block % len(MODES):] + MODES[:block % len(MODES)]
        for mode in order:
            flag = torch.zeros(1)
            dist.barrier()
            with StopRequest() as stop:
                t0 = time.perf_counter()
                for _ in range(steps):
                    _step(a, matmuls, collective)
                    if mode == "poll":
                        stop.poll()
                    elif mode == "every":
                        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                elapsed = torch.tensor([(time.perf_counter() - t0) / steps])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
            best[mode] = min(best[mode], elapsed.item())
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="steps per block [%(default)s]")
    p.add_argument("--blocks", type=int, default=5, help="blocks per mode [%(default)s]")
    p.add_argument("--step-ms", type=float, default=2.5, help="compute per stand-in step [%(default)s]")
    args = p.parse_args(argv)
    for name in ("steps", "blocks"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.step_ms <= 0:
        p.error(f"--step-ms must be > 0, got {args.step_ms}")
    best = spawn(_worker, 2, args=(args.steps, args.blocks, args.step_ms), threads=1)[0]
    print(f"StopRequest cost, Gloo K=2, 1 thread per rank, {args.steps} steps x {args.blocks} blocks "
          f"(fastest block per mode)")
    print(f"{'mode':<6} {'us/step':>9} {'vs none':>8}")
    for mode in MODES:
        print(f"{mode:<6} {best[mode] * 1e6:9.0f} {best[mode] / best['none']:8.3f}")


if __name__ == "__main__":
    main()
