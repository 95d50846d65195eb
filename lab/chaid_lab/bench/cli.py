"""``chaid-lab bench ...``: the benchmark group.

Importing this module is cheap: each benchmark imports torch, the store and the daemon's
client inside its command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chaid.store.settings import EMBEDDERS, StoreSettings
from chaid_lab.cli_args import add_sampler_args, int_list, sampler_args


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
    from chaid_lab.bench.quality import command

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
    from chaid_lab.bench.ablation import command

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
    p.add_argument("--parts", default="", help="comma list of steps,quality,ablation,"
                   "hit_rates,daemon (default: all); the other parts of an existing "
                   "results.json of the same settings are kept")
    p.add_argument("--model", default="tiny-shapes", help="model preset (default tiny-shapes)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_bench_report)


def _cmd_bench_report(args: argparse.Namespace) -> int:
    from chaid_lab.bench.report import command

    return command(args)


def _register_bench_cache(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "cache", help="hit rates, lookup latency and index recall of the latent cache",
        description="Replay a prompt stream through lookup + insert for several budgets, "
        "policies and both matchers; time lookups at several store sizes.")
    p.add_argument("--prompts", type=Path, required=True, help="JSON list or text file")
    p.add_argument("--json", type=Path, required=True, dest="json_out", help="report file")
    p.add_argument("--payload-bytes", type=int, default=1_300_000,
                   help="latent bytes written per miss (default 1.3 MB, the paper's)")
    p.add_argument("--budgets", default="10,25,50,100,250",
                   help="budgets in entries of the payload size (comma list)")
    p.add_argument("--policies", default="lru,lfu,fifo,lcbfu")
    p.add_argument("--matching", default="entity,prompt")
    p.add_argument("--sizes", default="1000,10000,100000",
                   help="store sizes of the latency runs (comma list; empty: none)")
    p.add_argument("--latency-queries", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the embedder (default 1; 0: torch's default)")
    p.add_argument("--embedder-precision", default="float32", choices=("float32", "bfloat16"),
                   help="arithmetic of the embedder's linear layers (store.embedder_precision)")
    p.add_argument("--embedder", default="minilm-static", choices=EMBEDDERS,
                   help="store.embedder (default: minilm-static)")
    p.add_argument("--work-dir", type=Path, help="where the stores go (default: a temp dir)")
    p.add_argument("--plot", type=Path, help="also draw hit rate vs budget as a PNG "
                   "(needs matplotlib)")
    p.set_defaults(func=_cmd_bench_cache)


def _cmd_bench_cache(args: argparse.Namespace) -> int:
    from chaid.store.analysis import Analyzer
    from chaid_lab.bench.cache import load_prompts, run_cache_bench

    budgets = int_list("--budgets", args.budgets, 1, 10**9, empty=True)
    sizes = int_list("--sizes", args.sizes, 1, 10**9, empty=True)
    settings = StoreSettings(embedder_threads=args.threads, embedder=args.embedder,
                             embedder_precision=args.embedder_precision).validate()
    report = run_cache_bench(
        load_prompts(args.prompts), Analyzer.from_settings(settings),
        payload_bytes=args.payload_bytes, budget_entries=budgets,
        policies=[x for x in args.policies.split(",") if x],
        matchers=[x for x in args.matching.split(",") if x], sizes=sizes,
        latency_queries=args.latency_queries, seed=args.seed, work_dir=args.work_dir,
        base=settings,
    )
    report["command"] = "chaid-lab " + " ".join(sys.argv[1:])
    args.json_out.write_text(json.dumps(report, indent=2))
    if args.plot:
        from chaid_lab.bench.cache import plot_hit_rates

        plot_hit_rates(report, args.plot)
    for row in report["results"]:
        print(f"{row['matching']:>6} {row['policy']:>5} {row['budget_entries']:>5} entries "
              f"({row['budget_bytes']} B): hit rate {row['hit_rate']:.3f}")
    if report["lookup_ms"]:
        lm = report["lookup_ms"]
        print(f"lookup at {lm['entries']} entries: p50 {lm['p50']} ms, p99 {lm['p99']} ms")
    return 0


def _register_bench_threshold(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("threshold", help="calibrate the entity threshold on prompts")
    p.add_argument("--prompts", type=Path, required=True, help="JSON list or text file")
    p.add_argument("--json", type=Path, required=True, dest="json_out", help="report file")
    p.add_argument("--embedder", default="minilm-static", choices=EMBEDDERS,
                   help="store.embedder (default: minilm-static)")
    p.set_defaults(func=_cmd_bench_threshold)


def _cmd_bench_threshold(args: argparse.Namespace) -> int:
    from chaid.store.analysis import Analyzer
    from chaid_lab.bench.cache import load_prompts
    from chaid_lab.bench.threshold import calibrate_threshold

    settings = StoreSettings(embedder=args.embedder, embedder_threads=1)
    report = calibrate_threshold(load_prompts(args.prompts), Analyzer.from_settings(settings))
    args.json_out.write_text(json.dumps(report, indent=2))
    best = report["at_threshold"]
    print(f"threshold {report['threshold']}: precision {best['precision']}, "
          f"recall {best['recall']} over {report['pairs']} entity pairs")
    return 0


def _register_bench_matching(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "matching", help="precision and recall of entity matching on natural prompt triples",
        description="Put each triple's cached prompt into one store, then look up its "
        "should-hit and should-miss prompts (lab/chaid_lab/bench/data/match_pairs.json); "
        "print precision and recall for each embedder.")
    p.add_argument("--embedder", action="append", choices=EMBEDDERS,
                   help="store.embedder to measure (repeatable; default: all)")
    p.add_argument("--threshold", type=float,
                   help="store.entity_threshold (default: each embedder's own)")
    p.add_argument("--json", type=Path, dest="json_out", help="also write the full report")
    p.set_defaults(func=_cmd_bench_matching)


def _cmd_bench_matching(args: argparse.Namespace) -> int:
    from chaid.store.analysis import Analyzer
    from chaid_lab.bench.matching import evaluate

    reports = {}
    for name in args.embedder or EMBEDDERS:
        settings = StoreSettings(embedder=name, embedder_threads=1,
                                 entity_threshold=args.threshold).validate()
        r = reports[name] = evaluate(Analyzer.from_settings(settings), settings)
        print(f"{name:>14} threshold {r['threshold']:.2f}: precision {r['precision']:.3f}, "
              f"recall {r['recall']:.3f} ({r['triples']} triples; false hits: "
              f"{r['false_hits_on_miss_prompts']} from should-miss prompts, "
              f"{r['wrong_entry_hits']} on the wrong entry)")
    if args.json_out:
        args.json_out.write_text(json.dumps(reports, indent=2))
    return 0


def _register_bench_steps(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "steps", help="the step curve: plain-N, CHAI-N and full-30, paired, on every metric",
        description="On entity-sharing Shapes pairs, generate each second prompt with "
        "full-30, plain-N and CHAI-N for every N; judge and fidelity metrics; paired 95% "
        "bootstrap intervals of CHAI-N vs plain-N and of each method vs full-30. Resumes "
        "from the rows already in --out; --shard K/N splits the pairs between processes.")
    p.add_argument("--out", type=Path, required=True,
                   help="work directory: rows of finished pairs, the report and plot")
    p.add_argument("--pairs", type=int, help="entity-sharing pairs (default 256)")
    p.add_argument("--quick", action="store_true", help="4 pairs, N in 2,8 (CI smoke test)")
    p.add_argument("--steps", default="2,3,4,6,8,12", help="step counts N (comma list)")
    p.add_argument("--shard", default="0/1", help="K/N: run every Nth pair from the Kth")
    p.add_argument("--variants", default="chai",
                   help="cache methods beside plain-N: chai, chai-t, chai-cond, chai-kv, "
                   "chai-t-kv (comma list)")
    p.add_argument("--model", default="tiny-shapes", help="model preset (default tiny-shapes)")
    p.add_argument("--weights", help="DiT weights (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float,
                   help="classifier-free guidance scale of every run (default: the model's)")
    add_sampler_args(p, temporal_guidance=False)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.set_defaults(func=_cmd_bench_steps)


def _cmd_bench_steps(args: argparse.Namespace) -> int:
    from chaid.checks import check_int, check_number
    from chaid.errors import ChaidError
    from chaid.limits import MAX_CFG_SCALE

    steps = tuple(int_list("--steps", "2,8" if args.quick else args.steps, 1, 200))
    pairs = check_int("--pairs", args.pairs if args.pairs is not None else
                      (4 if args.quick else 256), 2, 100_000, ChaidError)
    try:
        k, n = (int(x) for x in args.shard.split("/"))
    except ValueError:
        raise ChaidError(f"--shard takes K/N, not {args.shard!r}") from None
    check_int("--shard N", n, 1, 64, ChaidError)
    check_int("--shard K", k, 0, n - 1, ChaidError)
    check_int("--threads", args.threads, 1, 256, ChaidError)
    import torch

    from chaid_lab.bench.steps import MODEL_CFG_SCALE, StepCurveConfig, plot, run, tables

    torch.set_num_threads(args.threads)
    variants = tuple(v for v in args.variants.split(",") if v)
    if args.cfg_scale is not None:
        check_number("--cfg-scale", args.cfg_scale, 0.0, MAX_CFG_SCALE, error=ChaidError)
    cfg = StepCurveConfig(model=args.model, weights=args.weights, pairs=pairs, steps=steps,
                          seed=args.seed, variants=variants, **sampler_args(args),
                          cfg_scale=MODEL_CFG_SCALE if args.cfg_scale is None
                          else args.cfg_scale)
    report = run(cfg, args.out, (k, n))
    if report is None:
        print(f"shard {k}/{n} done; other shards' pairs are still missing")
        return 0
    report["command"] = "chaid-lab " + " ".join(sys.argv[1:])
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    text = tables(report)
    (args.out / "tables.md").write_text(text + "\n")
    plot(report, args.out / "step-curve.png")
    print(text)
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    from chaid_lab.bench.daemon import register_bench_batches, register_bench_daemon
    from chaid_lab.bench.rpc import register_bench_rpc
    from chaid_lab.bench.shared import register_bench_shared

    p = sub.add_parser("bench", help="benchmarks", description="Run a benchmark.")
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for register in (_register_bench_cache, _register_bench_threshold, _register_bench_matching,
                     register_bench_quality,
                     register_bench_ablation, register_bench_report, register_bench_rpc,
                     register_bench_daemon, register_bench_batches, _register_bench_steps,
                     register_bench_shared):
        register(bench_sub)
