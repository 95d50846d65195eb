"""The ``chaid bench quality`` parser; cheap to import (the benchmark loads torch lazily)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register_bench_quality(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "quality",
        help="CHAI vs full, plain few-step, NIRVANA-VID and an intra cache",
        description="Serve the Shapes all-hit and stream workloads with every method in one "
        "run: median latency, speedup vs full-30, judge score, hit rate (docs/baselines.md).",
    )
    p.add_argument("--json", type=Path, dest="json_out", help="write the report here")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few prompts per workload (CI smoke test; minutes on a CPU)",
    )
    p.add_argument("--model", default="tiny-shapes", help="model preset (default tiny-shapes)")
    p.add_argument("--weights", help="DiT weights (default: the preset's shipped file)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--judge", help="judge weights (default: the shipped judge)")
    p.add_argument("--pairs", type=int, help="entity-sharing pairs of the all-hit workload")
    p.add_argument("--warm", type=int, help="unmeasured warm-up prompts of the stream")
    p.add_argument("--serve", type=int, help="measured prompts of the stream")
    p.add_argument("--workloads", default="", help="comma list of all-hit,stream (default both)")
    p.add_argument(
        "--intra-threshold",
        type=float,
        default=0.1,
        help="First-Block-Cache threshold (default 0.1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default 0: torch's choice); on a busy CPU, 1 "
        "avoids threads spinning against each other",
    )
    p.add_argument("--work-dir", type=Path, help="where the stores go (default: a temp dir)")
    p.set_defaults(func=_cmd_bench_quality)


def _cmd_bench_quality(args: argparse.Namespace) -> int:
    from chaid.engine.bench_quality import command

    return command(args)


def register_bench_ablation(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "ablation",
        help="CHAI settings one at a time: fast steps, cached steps and blocks, k/v, dtype",
        description="On all-hit Shapes pairs, vary one CHAI setting at a time from the "
        "defaults; judge score, latency, speedup vs full-30 and bytes per entry.",
    )
    p.add_argument("--pairs", type=int, default=24, help="entity-sharing pairs (default 24)")
    p.add_argument("--quick", action="store_true", help="2 pairs (CI smoke test)")
    p.add_argument("--model", default="tiny-shapes", help="model preset (default tiny-shapes)")
    p.add_argument("--weights", help="DiT weights (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", type=Path, dest="json_out", help="write the report here")
    p.set_defaults(func=_cmd_bench_ablation)


def _cmd_bench_ablation(args: argparse.Namespace) -> int:
    from chaid.engine.bench_ablation import command

    return command(args)


def register_bench_report(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "report",
        help="every table and plot of docs/results.md: quality, ablation, hit rates, daemon",
        description="Run the quality benchmark, the ablation, the hit-rate replay and the "
        "daemon benchmark; write results.json, tables.md and the plots into --out.",
    )
    p.add_argument("--out", type=Path, default=Path("results"), help="output directory")
    p.add_argument("--quick", action="store_true", help="a few prompts per part (minutes)")
    p.add_argument("--parts", default="", help="comma list of quality,ablation,hit_rates,"
                   "daemon (default: all)")
    p.add_argument("--model", default="tiny-shapes", help="model preset (default tiny-shapes)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_bench_report)


def _cmd_bench_report(args: argparse.Namespace) -> int:
    from chaid.engine.bench_report import command

    return command(args)
