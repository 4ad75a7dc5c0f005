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


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(workers=args.workers, steps=args.steps, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyowt", description="Parallel CNN training in PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="print versions, the compiled extension and each op's backend (JSON)")
    s.set_defaults(func=_cmd_info)
    s = sub.add_parser("demo", help="a short real training run on CPU Gloo workers (the README's main job)")
    s.add_argument("--workers", type=int, default=2, help="Gloo worker processes (default 2)")
    s.add_argument("--steps", type=int, default=150, help="SGD steps (default 150)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
