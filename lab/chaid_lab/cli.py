"""The ``chaid-lab`` command line: the demo, the benchmarks and the Shapes world.

Sub-commands register themselves as the product's do (``register(subparsers)``), and errors
are reported the same way (:func:`chaid.cli.run_command`). Heavy imports happen inside the
commands, so ``chaid-lab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from chaid.cli import add_common_flags, run_command
from chaid_lab.bench.cli import register_bench
from chaid_lab.demo import register_demo
from chaid_lab.shapes.cli import register as register_shapes

REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    register_demo,
    register_bench,
    register_shapes,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chaid-lab",
        description="chaid-lab: the demo, benchmarks and Shapes world of chaid",
    )
    add_common_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
