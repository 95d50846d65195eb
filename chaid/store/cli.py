"""``chaid cache ...`` (offline store tools) and ``chaid bench ...`` (the benchmark group).

Importing this module is cheap: lmdb, spaCy and torch are imported inside the commands.
``stats``, ``ls`` and ``show`` open the store read-only and may run beside the daemon;
``evict``, ``check --repair`` and ``compact`` take the store's writer lock and refuse to run
while the daemon holds it.

The bench group is a list of registrars (:data:`BENCH_COMMANDS`); another package adds a
benchmark by appending ``register(bench_subparsers)`` to it before the parser is built.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from chaid.cli_args import int_list
from chaid.engine.bench_cli import (
    register_bench_ablation,
    register_bench_quality,
    register_bench_report,
)
from chaid.store.settings import StoreSettings


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, required=True, help="the store's data directory")


def _emit(args: argparse.Namespace, payload: object, text: str) -> None:
    print(json.dumps(payload, indent=2) if args.json else text)


# -- chaid cache ---------------------------------------------------------------------------


def register_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="inspect or maintain a latent cache offline",
                       description="Inspect or maintain the latent cache in a data directory.")
    cache_sub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")

    s = cache_sub.add_parser("stats", help="counts, bytes, index state")
    _add_data_dir(s)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_cmd_stats)

    s = cache_sub.add_parser("ls", help="list entries, most recently used first")
    _add_data_dir(s)
    s.add_argument("--limit", type=int, default=50, help="at most this many (0: all)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_cmd_ls)

    s = cache_sub.add_parser("show", help="one entry: record, latents, checksums")
    s.add_argument("entry_id", type=int)
    _add_data_dir(s)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_cmd_show)

    s = cache_sub.add_parser("evict", help="remove entries (needs the daemon stopped)")
    s.add_argument("entry_ids", type=int, nargs="*")
    s.add_argument("--all", action="store_true", help="remove every entry")
    _add_data_dir(s)
    s.set_defaults(func=_cmd_evict)

    s = cache_sub.add_parser("check", help="verify consistency (optionally repair)")
    _add_data_dir(s)
    s.add_argument("--repair", action="store_true",
                   help="delete orphans, fix totals, rebuild the index (daemon stopped)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_cmd_check)

    s = cache_sub.add_parser("compact", help="rewrite the LMDB file without free pages")
    _add_data_dir(s)
    s.set_defaults(func=_cmd_compact)


def _reader(args: argparse.Namespace):
    from chaid.store.db import LatentDB

    return LatentDB(args.data_dir, readonly=True)


def _cmd_stats(args: argparse.Namespace) -> int:
    from chaid.store.tools import store_stats

    stats = store_stats(args.data_dir)
    lines = [f"{k}: {v}" for k, v in stats.items() if not isinstance(v, dict)]
    for k, v in stats.items():
        if isinstance(v, dict):
            lines.append(f"{k}: " + ", ".join(f"{kk}={vv}" for kk, vv in v.items()))
    _emit(args, stats, "\n".join(lines))
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    db = _reader(args)
    try:
        with db.read() as txn:
            records = sorted(db.iter_records(txn), key=lambda r: -r.last_access)
    finally:
        db.close()
    if args.limit:
        records = records[: args.limit]
    rows = [{"id": r.entry_id, "hits": r.hits, "bytes": r.bytes, "last_access": r.last_access,
             "fingerprint": r.fingerprint, "shape": r.shape, "prompt": r.prompt,
             "entities": r.entities} for r in records]
    text = "\n".join(
        f"{r['id']:>8} {r['hits']:>5} {r['bytes']:>10}  {r['prompt'][:60]}"
        f"  [{', '.join(r['entities'])}]" for r in rows)
    _emit(args, rows, f"{'id':>8} {'hits':>5} {'bytes':>10}  prompt  [entities]\n{text}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from chaid.store.tools import show_entry

    info = show_entry(args.data_dir, args.entry_id)
    text = "\n".join(f"{k}: {v}" for k, v in info.items())
    _emit(args, info, text)
    return 0


def _cmd_evict(args: argparse.Namespace) -> int:
    from chaid.store.cache import LatentCache
    from chaid.store.errors import StoreError

    if not args.all and not args.entry_ids:
        raise StoreError("name entry ids to evict, or --all")
    with LatentCache.open_existing(StoreSettings(data_dir=args.data_dir),
                                   background_rebuild=False) as cache:
        removed = cache.clear() if args.all else cache.evict(args.entry_ids)
    print(f"evicted {len(removed)} entries" + (f": {removed}" if removed else ""))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from chaid.store.cache import LatentCache

    with LatentCache.open_existing(StoreSettings(data_dir=args.data_dir, budget_bytes=1 << 60),
                                   background_rebuild=False) as cache:
        report = cache.check(repair=args.repair)
    payload = {"ok": report.ok, "entries": report.entries, "total_bytes": report.total_bytes,
               "problems": report.problems, "repaired": report.repaired}
    text = "consistent" if report.ok else "problems:\n  " + "\n  ".join(report.problems)
    if report.repaired:
        text += "\nrepaired: " + "; ".join(report.repaired)
    _emit(args, payload, f"{report.entries} entries, {report.total_bytes} bytes: {text}")
    return 0 if report.ok or report.repaired else 1


def _cmd_compact(args: argparse.Namespace) -> int:
    from chaid.store.tools import compact

    before, after = compact(args.data_dir)
    print(f"compacted {args.data_dir}: {before} -> {after} bytes")
    return 0


# -- chaid bench ---------------------------------------------------------------------------


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
    p.add_argument("--work-dir", type=Path, help="where the stores go (default: a temp dir)")
    p.add_argument("--plot", type=Path, help="also draw hit rate vs budget as a PNG "
                   "(needs matplotlib)")
    p.set_defaults(func=_cmd_bench_cache)


def _cmd_bench_cache(args: argparse.Namespace) -> int:
    from chaid.store.analysis import Analyzer
    from chaid.store.bench import load_prompts, run_cache_bench

    budgets = int_list("--budgets", args.budgets, 1, 10**9)
    sizes = int_list("--sizes", args.sizes, 1, 10**9, empty=True)
    settings = StoreSettings(embedder_threads=args.threads,
                             embedder_precision=args.embedder_precision).validate()
    report = run_cache_bench(
        load_prompts(args.prompts), Analyzer.from_settings(settings),
        payload_bytes=args.payload_bytes, budget_entries=budgets,
        policies=[x for x in args.policies.split(",") if x],
        matchers=[x for x in args.matching.split(",") if x], sizes=sizes,
        latency_queries=args.latency_queries, seed=args.seed, work_dir=args.work_dir,
        base=settings,
    )
    report["command"] = "chaid " + " ".join(sys.argv[1:])
    args.json_out.write_text(json.dumps(report, indent=2))
    if args.plot:
        from chaid.store.bench import plot_hit_rates

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
    p.set_defaults(func=_cmd_bench_threshold)


def _cmd_bench_threshold(args: argparse.Namespace) -> int:
    from chaid.store.analysis import Analyzer
    from chaid.store.bench import load_prompts
    from chaid.store.calibrate import calibrate_threshold

    report = calibrate_threshold(load_prompts(args.prompts),
                                 Analyzer.from_settings(StoreSettings()))
    args.json_out.write_text(json.dumps(report, indent=2))
    best = report["at_threshold"]
    print(f"threshold {report['threshold']}: precision {best['precision']}, "
          f"recall {best['recall']} over {report['pairs']} entity pairs")
    return 0


# Registrars of the bench group's sub-commands; other packages append theirs.
BENCH_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_bench_cache,
    _register_bench_threshold,
    register_bench_quality,
    register_bench_ablation,
    register_bench_report,
]


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks", description="Run a benchmark.")
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for register in BENCH_COMMANDS:
        register(bench_sub)
