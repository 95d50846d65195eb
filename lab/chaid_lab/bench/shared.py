"""``chaid-lab bench shared``: a prompt stream across 1, 2 and 4 daemons' stores, each cache
its own ("split") or joined through a real redis-server ("shared").

Prompt i goes to store i mod N, as a load balancer would send requests to N hosts. Each
prompt is looked up (the daemon's entity matching, the real analyzer); a hit reads the
entry's latents (from the local tier, or fetched from Redis for a shared entry not fetched
yet, timed apart), a miss writes synthetic latents of the payload size and, when shared,
publishes them; the next prompt starts once every other store has imported the entry, as
requests a second or more apart would. Reported per N and mode: hit rate, median and p99
latent read time for local and for Redis-fetched hits, and bytes moved through Redis.
Store-level: no model runs, so the figures are the cache's alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# tiny-shapes' cached latents: three steps of (4, 8, 8, 8) in float16, 12 kB an entry.
PAYLOAD_SHAPE = (4, 8, 8, 8)
PAYLOAD_STEPS = (2, 3, 4)
DAEMONS = (1, 2, 4)


def register_bench_shared(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "shared", help="hit rate and hit latency of 1-4 daemons, split vs shared through Redis",
        description="Replay a prompt stream across N stores, each its own cache or all "
        "joined through a real redis-server: hit rate, local vs Redis-fetched latent reads, "
        "bytes moved. Needs redis-server.")
    p.add_argument("--prompts", type=Path,
                   help="JSON list or text file (default: a Shapes stream of --count prompts)")
    p.add_argument("--count", type=int, default=400, help="prompts of the default stream")
    p.add_argument("--daemons", default=",".join(map(str, DAEMONS)),
                   help="store counts (comma list, default 1,2,4)")
    p.add_argument("--json", type=Path, dest="json_out", help="write the report here")
    p.set_defaults(func=_cmd)


def _latents(i: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(i)
    return {s: rng.standard_normal(PAYLOAD_SHAPE).astype(np.float32) for s in PAYLOAD_STEPS}


def _redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    if shutil.which("redis-server") is None:
        from chaid.errors import ChaidError

        raise ChaidError("bench shared needs redis-server (apt-get install redis-server)")
    sock = workdir / "redis.sock"
    proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(sock),
                             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start")
        time.sleep(0.02)
    return proc, f"unix://{sock}"


def replay(prompts: list[str], n: int, shared: bool, analyzer, workdir: Path,
           url: str | None) -> dict:
    from chaid.store.cache import LatentCache
    from chaid.store.db import REMOTE_KEY
    from chaid.store.settings import StoreSettings
    from chaid.store.shared import SharedTier

    stores, tiers = [], []
    namespace = f"bench{n}{'s' if shared else 'x'}"
    for k in range(n):
        settings = StoreSettings(data_dir=workdir / f"{namespace}-{k}", durable=False)
        store = LatentCache(settings, embedder=(analyzer.embedder.name, analyzer.embedder.dim),
                            analyzer=analyzer)
        stores.append(store)
        if shared:
            tiers.append(SharedTier(url, store, namespace=namespace).start())
    try:
        for tier in tiers:
            _wait(lambda t=tier: t.available)
        hits = 0
        local_ms: list[float] = []
        remote_ms: list[float] = []
        fetched_bytes = published_bytes = 0
        for i, prompt in enumerate(prompts):
            k = i % n
            store = stores[k]
            result = store.lookup(prompt, "fp", PAYLOAD_SHAPE)
            if result.hit:
                hits += 1
                remote = store.get_record(result.entry_id).extra.get(REMOTE_KEY, False)
                t0 = time.perf_counter()
                latents = store.get_latents(result.entry_id)
                ms = (time.perf_counter() - t0) * 1e3
                (remote_ms if remote else local_ms).append(ms)
                if remote:
                    fetched_bytes += sum(a.nbytes for a in latents.values())
                continue
            inserted = store.insert(prompt, _latents(i), "fp")
            if shared:
                tiers[k].publish(inserted.entry_id)
                published_bytes += inserted.bytes
                gid = tiers[k].gid(inserted.entry_id)
                for j, other in enumerate(stores):
                    if j != k:
                        _wait(lambda o=other, g=gid: o.entry_for(g) is not None)
        return {"daemons": n, "mode": "shared" if shared else "split",
                "prompts": len(prompts), "hit_rate": round(hits / len(prompts), 4),
                "local_read_ms": _summary(local_ms), "redis_read_ms": _summary(remote_ms),
                "bytes_published": published_bytes, "bytes_fetched": fetched_bytes}
    finally:
        for tier in tiers:
            tier.stop()
        for store in stores:
            store.close()


def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p99": None}
    ordered = sorted(values)
    return {"n": len(values), "p50": round(statistics.median(ordered), 3),
            "p99": round(ordered[int(0.99 * (len(ordered) - 1))], 3)}


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("the shared tier did not catch up in time")
        time.sleep(0.002)


def run(prompts: list[str], daemons: tuple[int, ...]) -> dict:
    from chaid.store.analysis import Analyzer
    from chaid.store.settings import StoreSettings

    analyzer = Analyzer.from_settings(StoreSettings())
    rows = []
    with tempfile.TemporaryDirectory(prefix="chaid-bench-shared-") as tmp:
        proc, url = _redis(Path(tmp))
        try:
            for n in daemons:
                for shared in ((False, True) if n > 1 else (False,)):
                    print(f"{n} store(s), {'shared' if shared else 'split'}", file=sys.stderr,
                          flush=True)
                    rows.append(replay(prompts, n, shared, analyzer, Path(tmp), url))
        finally:
            proc.terminate()
            proc.wait(10)
    return {"payload_bytes": int(np.prod(PAYLOAD_SHAPE)) * 2 * len(PAYLOAD_STEPS),
            "rows": rows}


def format_table(report: dict) -> str:
    lines = ["| daemons | cache | hit rate | local read p50/p99 ms | Redis read p50/p99 ms "
             "| Redis hits | MB published | MB fetched |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        loc, rem = r["local_read_ms"], r["redis_read_ms"]
        lines.append(
            f"| {r['daemons']} | {r['mode']} | {r['hit_rate']:.3f} | "
            f"{_pair(loc)} | {_pair(rem)} | {rem['n']} | {r['bytes_published'] / 1e6:.2f} | "
            f"{r['bytes_fetched'] / 1e6:.2f} |")
    return "\n".join(lines)


def _pair(s: dict) -> str:
    return "–" if not s["n"] else f"{s['p50']:.2f} / {s['p99']:.2f}"


def _cmd(args: argparse.Namespace) -> int:
    from chaid_lab.bench.cache import load_prompts
    from chaid_lab.bench.quality import shapes_stream
    from chaid_lab.cli_args import int_list

    prompts = load_prompts(args.prompts) if args.prompts else shapes_stream(args.count)
    daemons = tuple(sorted(set(int_list("--daemons", args.daemons, 1, 16))))
    report = run(prompts, daemons)
    print(format_table(report))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=1))
    return 0
