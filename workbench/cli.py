"""The ``workbench`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench", description="Low-rank adaptation experiments.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="adapt a digits classifier to mirrored digits with every variant")
    demo.add_argument("--rank", type=int, default=4, help="adapter rank (default 4)")
    demo.add_argument("--steps", type=int, default=300, help="training steps per variant (default 300)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        from .demo import run_demo

        try:
            run_demo(rank=args.rank, steps=args.steps, seed=args.seed)
        except ValueError as error:
            parser.error(str(error))
    return 0
