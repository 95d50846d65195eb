"""``chaid cache ...``: offline tools for a latent store.

Importing this module is cheap: lmdb, spaCy and torch are imported inside the commands.
``stats``, ``ls`` and ``show`` open the store read-only and may run beside the daemon;
``evict``, ``check --repair`` and ``compact`` take the store's writer lock and refuse to run
while the daemon holds it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
                   help="delete orphans and damaged entries, fix totals, rebuild the index; "
                        "salvage the intact entries of a damaged file (daemon stopped)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=_cmd_check)

    s = cache_sub.add_parser("compact", help="rewrite the LMDB file without free pages")
    _add_data_dir(s)
    s.set_defaults(func=_cmd_compact)


def _reader(args: argparse.Namespace):
    from chaid.store.integrity import open_reader

    return open_reader(args.data_dir)


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
    from chaid.store.errors import StoreCorruptError
    from chaid.store.integrity import salvage
    from chaid.store.maintenance import CheckReport

    settings = StoreSettings(data_dir=args.data_dir, budget_bytes=1 << 60)
    salvaged = None
    for attempt in (1, 2):
        try:
            with LatentCache.open_existing(settings, background_rebuild=False) as cache:
                report = cache.check(repair=args.repair)
        except StoreCorruptError as exc:  # the files or the trees: the store cannot open
            report = CheckReport(problems=[str(exc)], damaged=True)
        if not (report.damaged and args.repair and attempt == 1):
            break
        # Copy every intact entry into a new file, keep the damaged one, check again.
        salvaged = salvage(args.data_dir)
        if salvaged.unreadable:  # nothing left to check: the next open starts empty
            report = CheckReport()
            break
    if salvaged is not None:
        report.repaired.insert(0, salvaged.summary())
    payload = {"ok": report.ok, "damaged": report.damaged, "entries": report.entries,
               "total_bytes": report.total_bytes, "problems": report.problems,
               "repaired": report.repaired,
               "lost": {} if salvaged is None else salvaged.lost}
    text = "consistent" if report.ok else "problems:\n  " + "\n  ".join(report.problems)
    if report.damaged and not args.repair:
        text += "\nthe store is damaged: `--repair` copies every intact entry into a new " \
                "file and keeps the damaged one beside it"
    if report.repaired:
        text += "\nrepaired: " + "; ".join(report.repaired)
    _emit(args, payload, f"{report.entries} entries, {report.total_bytes} bytes: {text}")
    return 0 if report.ok or (report.repaired and not report.damaged) else 1


def _cmd_compact(args: argparse.Namespace) -> int:
    from chaid.store.tools import compact

    before, after = compact(args.data_dir)
    print(f"compacted {args.data_dir}: {before} -> {after} bytes")
    return 0
