"""``chaid-lab demo``: a daemon, a client, and a short scripted session that shows CHAI at work.

Starts ``chaid serve`` on a temporary socket and data directory, sends a miss, prompts that
share an entity with it (hits: 8 steps instead of 30) and one unrelated prompt (a miss),
writes the videos, prints a table and the speed-up, then stops the daemon with SIGTERM and
checks it exited cleanly. The client is the real ``chai_client``, over the real socket.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The scripted session: a miss, two prompts that share an entity with it, an unrelated one.
SESSION = (
    "a red circle moving to the left across a grassy field",
    "a blue square bouncing over a grassy field",
    "a red circle drifting upward over the ocean",
    "a yellow triangle sliding right through a desert",
)
# Generous for a cold start on a small machine (imports, spaCy, MiniLM, the model).
START_TIMEOUT_S = 180.0


def register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="start a daemon, run a short CHAI session, stop it",
        description="Start chaid serve on a temporary socket and data directory, send a miss, "
        "prompts that share an entity with it (hits: 8 steps instead of 30) and an unrelated "
        "prompt, write the videos, print a table and the speed-up, then stop the daemon.")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="where videos go")
    p.add_argument("--model", default=None, help="model preset (default: the default model)")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    p.set_defaults(func=_cmd_demo)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def start_daemon(workdir: Path, model: str | None, env: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen, Path, Path]:
    sock = workdir / "chaid.sock"
    log_path = workdir / "chaid.log"
    cmd = [sys.executable, "-m", "chaid", "serve", "--socket", str(sock),
           "--data-dir", str(workdir / "data")]
    if model:
        cmd += ["--model", model]
    # The daemon's own thread default (one torch thread for a small model on the CPU);
    # one embedder thread beside it.
    env = {**os.environ, "CHAID_STORE_EMBEDDER_THREADS": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, sock, log_path


def wait_ready(proc: subprocess.Popen, sock: Path, log_path: Path) -> None:
    from chai_client import ChaiError, Client

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"chaid serve exited with {proc.returncode}:\n"
                             f"{log_path.read_text(errors='replace')[-3000:]}")
        if sock.exists():
            try:
                with Client(sock, timeout=5) as c:
                    c.ping()
                return
            except ChaiError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"chaid serve was not ready within {START_TIMEOUT_S} s")


def _cmd_demo(args: argparse.Namespace) -> int:
    from chai_client import Client

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chaid-demo-") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        proc, sock, log_path = start_daemon(workdir, args.model)
        try:
            wait_ready(proc, sock, log_path)
            print(f"daemon ready in {time.perf_counter() - t0:.1f} s on {sock}")
            rows = []
            with Client(sock) as client:
                for i, prompt in enumerate(SESSION, 1):
                    result = client.generate(prompt)
                    path = args.out / f"{i}-{_slug(prompt)}.mp4"
                    path.write_bytes(result.video)
                    match = result.matched
                    rows.append({
                        "prompt": prompt,
                        "cache": result.cache,
                        "matched": (", ".join(f"{e.query} ~ {e.cached} ({e.cosine:.2f})"
                                              for e in match.entities) if match else ""),
                        "steps": result.steps,
                        "ms": result.timings["client_total_ms"],
                        "video": str(path),
                    })
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            code = proc.wait(120)
    _print_table(rows)
    if args.json:
        print(json.dumps(rows, indent=2))
    print(f"daemon stopped with exit status {code}; videos in {args.out}/")
    return 0 if code == 0 else 1


def _print_table(rows: list[dict]) -> None:
    width = max(len(r["prompt"]) for r in rows)
    mwidth = max([len(r["matched"]) for r in rows] + [len("matched entity")])
    print(f"\n{'prompt':<{width}}  cache  {'matched entity':<{mwidth}}  steps  latency")
    for r in rows:
        print(f"{r['prompt']:<{width}}  {r['cache']:<5}  {r['matched']:<{mwidth}}  "
              f"{r['steps']:>5}  {r['ms'] / 1000:6.2f} s")
    misses = [r["ms"] for r in rows if r["cache"] == "miss"]
    hits = [r["ms"] for r in rows if r["cache"] == "hit"]
    if misses and hits:
        miss_ms, hit_ms = sum(misses) / len(misses), sum(hits) / len(hits)
        print(f"\nmean miss {miss_ms / 1000:.2f} s, mean hit {hit_ms / 1000:.2f} s: "
              f"hits are {miss_ms / hit_ms:.1f}x faster end to end")
