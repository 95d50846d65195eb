"""``chaid-lab bench rpc``: what the daemon adds to a generation, and how fast it answers.

Starts ``chaid serve`` (as ``chaid-lab demo`` does), then measures through ``chai_client``:
ping round trips on an idle daemon and while a long generation occupies the device (the
event loop must not block on model work); ``generate`` end to end (raw frames and MP4)
against the same request run in this process with :class:`~chaid.engine.pipeline.Pipeline`.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path


def register_bench_rpc(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("rpc", help="RPC overhead of the daemon: ping latency, "
                             "generate end to end vs in process")
    p.add_argument("--model", default="tiny-test")
    p.add_argument("--pings", type=int, default=1000)
    p.add_argument("--runs", type=int, default=10, help="generations per variant")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--json", type=Path, dest="json_out", help="write the report here")
    p.set_defaults(func=_cmd_bench_rpc)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def _summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": percentile(values, 0.5), "p99": percentile(values, 0.99),
            "mean": round(statistics.fmean(values), 3)}


def _cmd_bench_rpc(args: argparse.Namespace) -> int:
    from chai_client import Client
    from chaid_lab.demo import start_daemon, wait_ready

    report: dict = {"model": args.model, "steps": args.steps}
    prompt = "a red circle moving to the left across a grassy field"
    # 1. the same request in this process first (same thread settings as the daemon's),
    # while the machine runs nothing else of ours
    import torch

    from chaid.config import load_settings
    from chaid.engine.pipeline import GenerationRequest, Pipeline

    torch.set_num_threads(1)
    pipeline = Pipeline.from_settings(load_settings(overrides={"model": {"name": args.model}}))
    request = GenerationRequest(prompt, steps=args.steps)
    pipeline.generate(request)
    local = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        pipeline.generate(request)
        local.append((time.perf_counter() - t0) * 1e3)
    report["in_process_ms"] = _summary(local)
    del pipeline
    with tempfile.TemporaryDirectory(prefix="chaid-bench-") as tmp:
        proc, sock, log_path = start_daemon(Path(tmp), args.model)
        try:
            wait_ready(proc, sock, log_path)
            with Client(sock) as c:
                # 2. ping on an idle daemon
                pings = []
                for _ in range(args.pings):
                    t0 = time.perf_counter()
                    c.ping()
                    pings.append((time.perf_counter() - t0) * 1e3)
                report["ping_idle_ms"] = _summary(pings)
                # 3. generate end to end, raw frames and MP4
                for fmt in ("frames", "mp4"):
                    c.generate(prompt, cache="off", steps=args.steps, format=fmt)  # warm-up
                    ends, daemon_side, added = [], [], []
                    for _ in range(args.runs):
                        r = c.generate(prompt, cache="off", steps=args.steps, format=fmt)
                        ends.append(r.timings["client_total_ms"])
                        daemon_side.append(r.timings["generate_ms"])
                        # Everything but the pipeline: queue, RPC, video encoding, transfer.
                        added.append(r.timings["client_total_ms"] - r.timings["generate_ms"])
                    report[f"generate_{fmt}_ms"] = _summary(ends)
                    report[f"generate_{fmt}_model_ms"] = _summary(daemon_side)
                    report[f"generate_{fmt}_added_ms"] = _summary(added)
                # 4. ping while a long generation runs on the device
                busy = threading.Event()

                def long_job() -> None:
                    with Client(sock) as c2:
                        busy.set()
                        c2.generate(prompt, cache="off", steps=min(200, args.steps * 6),
                                    frames=16, height=128, width=128, format="frames")

                worker = threading.Thread(target=long_job)
                worker.start()
                busy.wait()
                time.sleep(0.2)
                pings = []
                while worker.is_alive():
                    t0 = time.perf_counter()
                    c.ping()
                    pings.append((time.perf_counter() - t0) * 1e3)
                    time.sleep(0.002)
                worker.join()
                report["ping_during_generation_ms"] = _summary(pings)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)
    return 0
