"""``chaid-lab bench daemon``: a Shapes prompt stream through the real daemon, 1-16 clients.

For every concurrency level a fresh ``chaid serve`` starts on a temporary socket and data
directory, is warmed with the stream's first prompts (one client, unmeasured), and then
serves the measured prompts from N client threads that take the next prompt from a shared
queue, each over its own connection. Reported per level: wall time, throughput, p50/p99
end-to-end latency seen by the client, hit rate and ``busy`` refusals (a refused request is
retried after a short back-off, as a well-behaved client does).

The same warm-up and stream also run in this process through
:class:`~chaid.engine.chai.ChaiEngine` (lookup, generation, cache write, one after another,
as the daemon's worker does), so the daemon's overhead is measured against it in one run.
Videos come back as raw frames, so no MP4 encoding is timed on either side.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_CLIENTS = (1, 4, 16)
DEFAULT_BATCHES = (1, 2, 4, 8)
# How often the pinger beside the generating clients calls ping.
PING_EVERY_S = 0.02
# Timed forwards per batch size, after two untimed ones.
BATCH_REPS = 10


def register_bench_daemon(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "daemon",
        help="the Shapes stream through the real daemon with 1, 4 and 16 clients",
        description="Throughput, p50/p99 latency and hit rate of a prompt stream served by "
        "chaid serve to concurrent clients, against the same stream in process.",
    )
    p.add_argument("--model", default="tiny-shapes", help="model preset (default tiny-shapes)")
    default = ",".join(map(str, DEFAULT_CLIENTS))
    p.add_argument("--clients", default=default, help=f"concurrency levels (default {default})")
    p.add_argument("--workers", default="1",
                   help="CPU workers of the daemon (server.cpu_workers), a comma list: every "
                        "client level runs with each (default 1)")
    p.add_argument("--max-batch", default="1",
                   help="jobs a worker batches (server.max_batch), a comma list: every client "
                        "and worker level runs with each (default 1: no batching)")
    p.add_argument("--warm", type=int, default=20, help="unmeasured warm-up prompts (20)")
    p.add_argument("--serve", type=int, default=96, help="measured prompts per level (96)")
    p.add_argument("--seed", type=int, default=0, help="stream seed (default 0)")
    p.add_argument("--quick", action="store_true", help="4 warm-up and 8 measured prompts")
    p.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)),
                   help="batch sizes of the step-batching curve (default 1,2,4,8; '' skips it)")
    p.add_argument("--json", type=Path, dest="json_out", help="write the report here")
    p.set_defaults(func=_cmd_bench_daemon)


def register_bench_batches(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "batches", help="the step-batching curve alone: B requests per forward, per device",
        description="Time one guided denoising step of B requests batched together, and B "
        "hits end to end through Pipeline.generate_batch, on one device (the daemon "
        "benchmark's first part; make gpu-check runs it on CUDA).")
    p.add_argument("--model", default="tiny-shapes", help="model preset (default tiny-shapes)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)),
                   help="batch sizes (default 1,2,4,8)")
    p.add_argument("--json", type=Path, dest="json_out", help="write the curve here")
    p.set_defaults(func=_cmd_bench_batches)


def _cmd_bench_batches(args: argparse.Namespace) -> int:
    from chaid_lab.cli_args import int_list

    batches = tuple(sorted(set(int_list("--batches", args.batches, 1, 256))))
    curve = batch_curve(args.model, batches, device=args.device)
    print(format_table({"batch_curve": curve}))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(curve, indent=1))
    return 0


def _level(clients: int, wall_s: float, runs: list[tuple[float, str]]) -> dict:
    """One row of the report: ``runs`` are (end-to-end ms, "hit" / "miss") per request."""
    from chaid_lab.bench.rpc import percentile

    latencies = [ms for ms, _ in runs]
    return {
        "clients": clients,
        "wall_s": round(wall_s, 2),
        "throughput_rps": round(len(runs) / wall_s, 3),
        "latency_ms": {
            "p50": round(percentile(latencies, 0.5), 1),
            "p99": round(percentile(latencies, 0.99), 1),
            "mean": round(statistics.fmean(latencies), 1),
        },
        "hit_rate": round(sum(c == "hit" for _, c in runs) / len(runs), 3),
    }


def batch_curve(model: str, batches: tuple[int, ...] = DEFAULT_BATCHES,
                device: str = "auto", reps: int = BATCH_REPS) -> dict:
    """Milliseconds of one guided denoising step (both guidance branches in one DiT call)
    for B requests batched together, at the preset's default video size: whether running
    several requests' steps in one forward would pay on this device. ``gain`` is
    B × (the step at batch 1) / (the step at batch B): 1.0 means batching buys nothing.
    ``hits_ms`` / ``hits_gain``: the same end to end, B hits (fast_steps plain steps, text
    encoding and decoding included) through :meth:`Pipeline.generate_batch`."""
    import torch

    from chaid.engine.pipeline import GenerationRequest, Pipeline, resolve_device
    from chaid.engine.sampler import Guidance
    from chaid.models import build_parts

    dev = resolve_device(device)
    torch.set_num_threads(1)  # as one CPU worker runs (in_process below, demo.start_daemon)
    parts = build_parts(model, device=dev)
    pipe = Pipeline(parts, dev)
    req = pipe.resolve(GenerationRequest("a red circle moving left"))
    shape = parts.vae.latent_shape(req.frames, req.height, req.width)
    rows = []
    for b in batches:
        text = parts.text_encoder.encode(["a red circle moving left"] * b)
        guidance = Guidance(parts.dit, text, req.cfg_scale, req.fps, req.height, req.width)
        z = torch.randn((b, *shape), generator=torch.Generator().manual_seed(b)).to(dev)
        times = []
        with torch.inference_mode():
            for i in range(reps + 2):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                guidance.velocity(z, 500.0)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if i >= 2:
                    times.append((time.perf_counter() - t0) * 1e3)
        # end to end: B hits of fast_steps plain steps through Pipeline.generate_batch
        hits = [GenerationRequest(f"a red circle moving left, take {i}", seed=i,
                                  steps=pipe.chai.fast_steps) for i in range(b)]
        t0 = time.perf_counter()
        pipe.generate_batch(hits)
        rows.append({"batch": b, "ms_per_step": round(statistics.median(times), 2),
                     "hits_ms": round((time.perf_counter() - t0) * 1e3, 1)})
    # per request at the smallest batch: what B requests cost one after another
    step_alone = rows[0]["ms_per_step"] / rows[0]["batch"]
    hits_alone = rows[0]["hits_ms"] / rows[0]["batch"]
    for row in rows:
        row["ms_per_request_step"] = round(row["ms_per_step"] / row["batch"], 2)
        row["gain"] = round(step_alone * row["batch"] / row["ms_per_step"], 2)
        row["hits_gain"] = round(hits_alone * row["batch"] / row["hits_ms"], 2)
    return {"device": str(dev), "threads": torch.get_num_threads(), "rows": rows}


def in_process(model: str, warm: list[str], serve: list[str], workdir: Path) -> dict:
    """The stream through ChaiEngine in this process: the reference without any RPC."""
    import torch

    from chaid.config import load_settings
    from chaid.engine.chai import ChaiEngine
    from chaid.modes import CacheMode

    torch.set_num_threads(1)  # the daemon's device worker uses one thread too (demo.start_daemon)
    settings = load_settings(
        overrides={"model": {"name": model}, "store": {"data_dir": str(workdir / "inproc")}}
    )
    engine = ChaiEngine.load(settings)
    try:

        def serve_one(prompt: str) -> tuple[float, str]:
            t0 = time.perf_counter()
            request = engine.resolve(prompt)
            outcome = engine.generate(request, CacheMode.AUTO, engine.lookup(request))
            ms = (time.perf_counter() - t0) * 1e3
            engine.insert(outcome)
            return ms, outcome.outcome.value

        for prompt in warm:
            serve_one(prompt)
        t0 = time.perf_counter()
        runs = [serve_one(p) for p in serve]
        wall = time.perf_counter() - t0
    finally:
        engine.close()
    return _level(0, wall, runs)


def through_daemon(model: str, clients: int, warm: list[str], serve: list[str],
                   workdir: Path, workers: int = 1, max_batch: int = 1) -> dict:
    """A fresh daemon with ``workers`` CPU workers batching up to ``max_batch`` jobs each,
    warmed, then ``serve`` from ``clients`` concurrent connections."""
    from chai_client import BusyError, Client
    from chaid_lab.demo import start_daemon, wait_ready

    workdir.mkdir(parents=True)
    # Exact repeats off: the in-process reference replays nothing, so neither does this.
    proc, sock, log_path = start_daemon(workdir, model,
                                        {"CHAID_SERVER_CPU_WORKERS": str(workers),
                                         "CHAID_SERVER_MAX_BATCH": str(max_batch),
                                         "CHAID_STORE_REPEAT_BYTES": "0"})
    try:
        wait_ready(proc, sock, log_path)
        with Client(sock) as c:
            for prompt in warm:
                c.generate(prompt, format="frames")
        todo: queue.Queue[str] = queue.Queue()
        for prompt in serve:
            todo.put(prompt)
        results: list[tuple[float, str]] = []
        errors: list[BaseException] = []
        busy = [0]
        lock = threading.Lock()
        served = [0] * clients  # requests each client completed: the fairness figure
        pings: list[float] = []
        done = threading.Event()

        def pinger() -> None:
            # Another app's health check beside the generating clients: how long a cheap
            # call waits while the workers are busy.
            try:
                with Client(sock, timeout=60) as c:
                    while not done.is_set():
                        t0 = time.perf_counter()
                        c.ping()
                        pings.append((time.perf_counter() - t0) * 1e3)
                        done.wait(PING_EVERY_S)
            except BaseException as exc:
                errors.append(exc)

        def client_loop(index: int) -> None:
            try:
                with Client(sock, timeout=600) as c:
                    while True:
                        try:
                            prompt = todo.get_nowait()
                        except queue.Empty:
                            return
                        t0 = time.perf_counter()
                        while True:
                            try:
                                r = c.generate(prompt, format="frames")
                                break
                            except BusyError:
                                with lock:
                                    busy[0] += 1
                                time.sleep(0.05)
                        ms = (time.perf_counter() - t0) * 1e3
                        with lock:
                            results.append((ms, r.cache))
                            served[index] += 1
            except BaseException as exc:  # reported below; a benchmark must not hide errors
                errors.append(exc)

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
        ping_thread = threading.Thread(target=pinger)
        t0 = time.perf_counter()
        ping_thread.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        done.set()
        ping_thread.join()
        if errors:
            raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    from chaid_lab.bench.rpc import percentile

    return {**_level(clients, wall, results), "workers": workers, "max_batch": max_batch,
            "busy_retries": busy[0],
            "ping_ms": {"count": len(pings),
                        "p50": round(percentile(pings, 0.5), 2) if pings else None,
                        "p99": round(percentile(pings, 0.99), 2) if pings else None},
            # the slowest client's share of an equal split (1.0: every client served alike)
            "slowest_share": round(min(served) / (len(results) / clients), 3)}


def run_daemon_bench(model: str, levels: list[int] | tuple[int, ...], warm_n: int,
                     serve_n: int, seed: int = 0, workers: tuple[int, ...] = (1,),
                     batches: tuple[int, ...] = DEFAULT_BATCHES,
                     max_batches: tuple[int, ...] = (1,)) -> dict:
    """The batch curve, then the Shapes stream in process and through a fresh daemon per
    client level."""
    from chaid_lab.bench.quality import shapes_stream

    stream = shapes_stream(warm_n + serve_n, seed)
    warm, serve = stream[:warm_n], stream[warm_n:]
    report: dict = {"model": model, "warm": warm_n, "serve": serve_n,
                    "cpu_count": os.cpu_count(), "levels": []}
    if batches:
        print(f"batch curve: {list(batches)}", file=sys.stderr, flush=True)
        report["batch_curve"] = batch_curve(model, batches)
    with tempfile.TemporaryDirectory(prefix="chaid-bench-daemon-") as tmp:
        print(f"in process: {warm_n} warm-up + {serve_n} prompts", file=sys.stderr, flush=True)
        ref = in_process(model, warm, serve, Path(tmp))
        report["in_process"] = ref
        for w in workers:
            for mb in max_batches:
                for n in levels:
                    print(f"daemon, {w} worker(s) batching {mb}, {n} client(s)",
                          file=sys.stderr, flush=True)
                    level = through_daemon(model, n, warm, serve,
                                           Path(tmp) / f"daemon-{w}-{mb}-{n}", workers=w,
                                           max_batch=mb)
                    level["throughput_vs_in_process"] = round(
                        level["throughput_rps"] / ref["throughput_rps"], 3)
                    report["levels"].append(level)
    return report


def _cmd_bench_daemon(args: argparse.Namespace) -> int:
    from chaid.errors import ChaidError
    from chaid_lab.cli_args import int_list

    levels = sorted(set(int_list("--clients", args.clients, 1, 64)))
    warm_n, serve_n = (4, 8) if args.quick else (args.warm, args.serve)
    if warm_n < 0 or serve_n < 1:
        raise ChaidError("--warm must be >= 0 and --serve >= 1")
    workers = tuple(sorted(set(int_list("--workers", args.workers, 1, 64))))
    batches = tuple(sorted(set(int_list("--batches", args.batches, 1, 64, empty=True))))
    max_batches = tuple(sorted(set(int_list("--max-batch", args.max_batch, 1, 64))))
    report = run_daemon_bench(args.model, levels, warm_n, serve_n, args.seed, workers,
                              batches, max_batches)
    print(format_table(report))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=1))
    return 0


def format_table(report: dict) -> str:
    lines = []
    curve = report.get("batch_curve")
    if curve:
        lines.append(f"one guided step at batch B ({curve['device']}, {curve['threads']} thread(s)):")
        lines += [f"  B={r['batch']:<3} {r['ms_per_step']:>9.1f} ms  {r['ms_per_request_step']:>8.1f}"
                  f" ms per request  gain {r['gain']:.2f}; B hits end to end"
                  f" {r['hits_ms']:.0f} ms, gain {r['hits_gain']:.2f}" for r in curve["rows"]]
    if "in_process" not in report:
        return "\n".join(lines)
    lines += [
        f"{'workers':>8}{'batch':>6}{'clients':>10}{'wall s':>9}{'req/s':>8}{'vs in-proc':>11}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'hit rate':>9}{'busy':>6}{'ping p99':>10}{'slowest':>9}"
    ]
    ref = report["in_process"]
    lines.append(
        f"{'':>8}{'':>6}{'in-proc':>10}{ref['wall_s']:>9.1f}{ref['throughput_rps']:>8.2f}{1.0:>11.2f}"
        f"{ref['latency_ms']['p50']:>9.0f}{ref['latency_ms']['p99']:>9.0f}"
        f"{ref['hit_rate']:>9.2f}{'':>6}"
    )
    for lv in report["levels"]:
        lines.append(
            f"{lv.get('workers', 1):>8}{lv.get('max_batch', 1):>6}{lv['clients']:>10}{lv['wall_s']:>9.1f}{lv['throughput_rps']:>8.2f}"
            f"{lv['throughput_vs_in_process']:>11.2f}{lv['latency_ms']['p50']:>9.0f}"
            f"{lv['latency_ms']['p99']:>9.0f}{lv['hit_rate']:>9.2f}{lv['busy_retries']:>6}"
            f"{lv['ping_ms']['p99'] or 0:>10.1f}{lv['slowest_share']:>9.2f}"
        )
    return "\n".join(lines)
