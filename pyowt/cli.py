"""The ``pyowt`` command (also ``python -m pyowt``)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _cmd_info(args) -> int:
    from . import info

    print(json.dumps(info(), indent=2, sort_keys=True, default=str))
    return 0


# compare()'s parameter -> the command-line flag that sets it
_COMPARE_FLAGS = {"batch": "--batch-size"}


def _cmd_compare(args) -> int:
    from .compare import CompareArgumentError, check_compare_args, compare

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    try:
        check_compare_args(args.model, strategies, args.workers, args.steps, args.batch_size, args.data,
                           args.size, args.lr)
    except CompareArgumentError as e:
        print(f"pyowt compare: error: {_COMPARE_FLAGS.get(e.param, '--' + e.param)}: {e.message}", file=sys.stderr)
        return 2
    compare(model=args.model, strategies=strategies, workers=args.workers, steps=args.steps,
            batch=args.batch_size, data=args.data, size=args.size, seed=args.seed, lr=args.lr,
            json_path=args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyowt", description="Parallel CNN training in PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="print versions, the compiled extension and each op's backend (JSON)")
    s.set_defaults(func=_cmd_info)
    s = sub.add_parser("compare", help="train with each strategy on K workers and compare throughput, "
                                         "communication, memory and loss against the single-process run")
    s.add_argument("--model", default="small", choices=["small", "alexnet"],
                   help="small (pyowt.models.AlexNetSmall) or torchvision's alexnet (needs --size >= 63) [small]")
    s.add_argument("--strategies", default="data,model,owt",
                   help="comma-separated presets (data, model, owt) or plan .json files [data,model,owt]")
    s.add_argument("--workers", type=int, default=2, help="Gloo worker processes per strategy [2]")
    s.add_argument("--steps", type=int, default=20, help="SGD steps; the first warms up and is not timed [20]")
    s.add_argument("--batch-size", type=int, default=64, help="global batch, split over the workers [64]")
    s.add_argument("--data", default="digits", choices=["digits", "synthetic"],
                   help="the bundled 8x8 handwritten digits (upscaled) or random images [digits]")
    s.add_argument("--size", type=int, default=32, help="image side in pixels [32]")
    s.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9) [0.05]")
    s.add_argument("--seed", type=int, default=0, help="seeds the model, the batches and dropout [0]")
    s.add_argument("--json", default=None, help="write the results here (and a figure next to it)")
    s.set_defaults(func=_cmd_compare)
    from .planner.cli import register as _register_plan

    _register_plan(sub)
    from .train.cli import register as _register_train

    _register_train(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        # One line instead of a traceback; the spawned workers are stopped (pyowt.launch).
        print(f"pyowt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
