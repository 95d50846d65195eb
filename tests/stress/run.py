"""The reliability suite (``make stress``): minutes of real faults against real processes,
ending in one table of figures against the goals of docs/reliability.md.

Sections (each can be run alone with ``--only NAME``):

``writer-kills``  a store writer (tests/store/crash_writer.py) SIGKILLed N times at random
                  points of inserts, evictions and index rebuilds; every reopen is
                  accounted against what the writer acknowledged.
``daemon-kills``  a daemon SIGKILLed in the middle of a miss, restarted, K times; every
                  acknowledged entry must survive.
``fuzz``          ≥ 100,000 frames from hypothesis strategies that know the protocol's
                  methods and parameters (and garbage besides), pipelined at a daemon:
                  it must stay alive, log no traceback and keep its memory flat.
``load``          16 clients pinging while two others generate: ping latency.
``admission``     the audit's oversized request (refused before any work), a deadline
                  refused at admission against the estimate, and deadlines inside a long
                  step.
``faults``        damaged latents under a running daemon (never served), a truncated
                  store and a damaged tree (refused at start; salvaged).

Usage: ``python tests/stress/run.py [--kills 200] [--frames 100000] [--only SECTION]
[--json out/stress.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
sys.path[:0] = [str(TESTS / "store"), str(TESTS / "server")]

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
from crashkit import account, replay, run_writer_and_kill  # noqa: E402
from daemonkit import BASE_ENV, CHAID, LONG, REPO, Daemon, Reader, raw_connect  # noqa: E402
from storekit import TOY_EMBEDDER, crash_settings  # noqa: E402

from chai_client import Client, RpcError  # noqa: E402
from chaid.store.cache import LatentCache  # noqa: E402
from chaid.store.db import LatentDB, latent_key  # noqa: E402

RED = "a red circle moving left over a grassy field"

# The fuzzed daemon's limits: every valid generate is small, so valid requests that the
# fuzzer stumbles on cost milliseconds, not seconds.
FUZZ_CONFIG = """
[server]
max_frames = 4
max_side = 64
queue_size = 4
read_timeout_s = 2.0
"""


class Table:
    """Rows of (check, figure, goal, pass) and the raw figures behind them."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, bool | None]] = []
        self.figures: dict[str, Any] = {}

    def add(self, check: str, figure: str, goal: str, ok: bool | None) -> None:
        self.rows.append((check, figure, goal, ok))
        mark = "" if ok is None else ("PASS" if ok else "FAIL")
        print(f"  {check}: {figure} (goal: {goal}) {mark}", flush=True)

    def render(self) -> str:
        lines = ["| check | measured | goal | |", "|---|---|---|---|"]
        for check, figure, goal, ok in self.rows:
            mark = "" if ok is None else ("pass" if ok else "**FAIL**")
            lines.append(f"| {check} | {figure} | {goal} | {mark} |")
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        return all(ok is not False for *_, ok in self.rows)


def section(name: str) -> None:
    print(f"\n== {name} ({time.strftime('%H:%M:%S')})", flush=True)


# -- writer kills ---------------------------------------------------------------------------


def writer_kills(table: Table, work: Path, kills: int) -> None:
    section(f"writer-kills: {kills} SIGKILLs of a store writer")
    data_dir = work / "writer-store"
    rng = np.random.default_rng(20261202)
    alive: dict[str, int] = {}
    start = acknowledged = evictions = 0
    lost: list[str] = []
    unexpected: list[str] = []
    corrupt: list[str] = []
    unfound: list[str] = []
    failed_opens = 0
    t0 = time.monotonic()
    for round_no in range(kills):
        lines = run_writer_and_kill(data_dir, seed=round_no, start=start,
                                    delay=float(rng.uniform(0.02, 0.6)))
        acknowledged += sum(1 for line in lines if line.startswith("done insert"))
        evictions += sum(1 for line in lines if line.startswith("done evict"))
        announced, pending = replay(lines, alive)
        try:
            with LatentCache(crash_settings(data_dir), embedder=TOY_EMBEDDER) as cache:
                got = account(cache, announced, pending)
        except Exception as exc:  # noqa: BLE001 - a failed open is a figure of the table
            failed_opens += 1
            print(f"  round {round_no}: the store did not open: {exc}", flush=True)
            break
        lost += sorted(got.lost)
        unexpected += sorted(got.unexpected)
        corrupt += got.corrupt
        unfound += got.unfound
        alive = got.stored
        start += sum(1 for line in lines if line.startswith("begin insert"))
        if (round_no + 1) % 25 == 0:
            print(f"  {round_no + 1}/{kills} kills, {acknowledged} acknowledged inserts, "
                  f"{len(lost)} lost ({time.monotonic() - t0:.0f} s)", flush=True)
    table.figures["writer_kills"] = {
        "kills": kills, "acknowledged_inserts": acknowledged, "evictions": evictions,
        "lost": lost, "unexpected": unexpected, "corrupt": corrupt, "unfound": unfound,
        "failed_opens": failed_opens, "seconds": round(time.monotonic() - t0, 1)}
    table.add(f"writer SIGKILL x{kills}: acknowledged entries lost",
              f"{len(lost)} of {acknowledged} ({evictions} evictions; {failed_opens} failed "
              f"opens, {len(corrupt)} corrupt, {len(unfound)} unfound)", "0",
              not lost and not failed_opens and not corrupt and not unfound and not unexpected)


# -- daemon kills ---------------------------------------------------------------------------


def daemon_kills(table: Table, work: Path, rounds: int) -> None:
    section(f"daemon-kills: {rounds} SIGKILLs of a daemon in the middle of a miss")
    workdir = work / "daemon-kills"
    acknowledged: set[int] = set()
    lost_total = 0
    rng = random.Random(7)
    for round_no in range(rounds):
        daemon = Daemon(workdir).start()
        try:
            with Client(daemon.socket) as c:
                ids = {e["id"] for e in c.cache_list(limit=0)}
                lost = acknowledged - ids
                lost_total += len(lost)
                done = c.generate(f"a shape number {round_no} in an empty room",
                                  cache="refresh")
                acknowledged.add(done.inserted["entry_id"])
            # A long miss, killed at a random point of its 30 steps.
            thread = threading.Thread(target=_doomed_miss, args=(
                daemon.socket, f"a long miss number {round_no} under the sea"))
            thread.start()
            time.sleep(rng.uniform(0.3, 1.5))
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
            thread.join(60)
        finally:
            daemon.kill()
        print(f"  round {round_no + 1}: {len(acknowledged)} acknowledged, {len(lost)} lost",
              flush=True)
    daemon = Daemon(workdir).start()
    try:
        with Client(daemon.socket) as c:
            ids = {e["id"] for e in c.cache_list(limit=0)}
    finally:
        daemon.stop()
    lost_total += len(acknowledged - ids)
    check = subprocess.run([*CHAID, "cache", "check", "--json", "--data-dir",
                            str(daemon.data_dir)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    consistent = check.returncode == 0 and json.loads(check.stdout)["ok"]
    table.figures["daemon_kills"] = {"rounds": rounds, "acknowledged": len(acknowledged),
                                     "lost": lost_total, "consistent": consistent}
    table.add(f"daemon SIGKILL mid-miss x{rounds}: committed entries lost",
              f"{lost_total} of {len(acknowledged)}; store "
              f"{'consistent' if consistent else 'INCONSISTENT'}", "0, consistent",
              lost_total == 0 and consistent)


def _doomed_miss(path: Path, prompt: str) -> None:
    """A long miss whose daemon is killed under it."""
    try:
        with Client(path) as c:
            c.generate(prompt, cache="refresh", **LONG)
    except Exception:  # noqa: BLE001, S110 - the connection dies with the daemon
        pass


# -- fuzz -----------------------------------------------------------------------------------


def frame_strategies():
    """Hypothesis strategies of one frame's bytes: requests that know the methods and
    their parameters (with values of every type), arbitrary msgpack values, and garbage."""
    from hypothesis import strategies as st

    from chaid.protocol import METHODS, PARAMS

    scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
               | st.binary(max_size=40))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner,
                                            max_size=4), max_leaves=12)
    sizes = st.integers(-3, 70) | st.sampled_from([2**31, 2**63 - 1, -(2**63)])

    def param_value(name: str):
        if name == "prompt":
            return st.text(max_size=60) | st.just(RED) | values
        if name in ("frames", "height", "width", "steps", "seed", "limit", "request_id"):
            return sizes | values
        if name in ("cfg_scale", "deadline_s"):
            return st.floats(-1, 200) | st.none() | values
        if name == "entry_ids":
            return st.lists(st.integers(-1, 2**64 - 1), max_size=5) | values
        return values

    def params_for(method: str):
        spec = PARAMS.get(method, {})
        known = st.fixed_dictionaries({}, optional={n: param_value(n) for n in spec}) \
            if spec else st.just({})
        return known | st.dictionaries(st.text(max_size=10), values, max_size=3)

    methods = sorted(METHODS)
    request = st.sampled_from(methods).flatmap(
        lambda m: st.tuples(st.just(0), st.integers(0, 2**32 - 1), st.just(m), params_for(m)))
    odd_request = st.tuples(st.integers(-2, 4) | values, st.integers(-1, 2**33) | values,
                            st.sampled_from([*methods, "nope", ""]) | values, values)
    packed = (request | odd_request | values).map(
        lambda v: (False, msgpack.packb(list(v) if isinstance(v, tuple) else v)))
    # Ext values of every code (negative ones are msgpack's reserved types, which
    # msgpack.ExtType refuses to build), as a parameter and as a frame's first element.
    ext = st.tuples(st.integers(-128, 127), st.binary(max_size=64), st.booleans()).map(
        lambda t: (False, _ext_frame(*t)))
    # Bytes that may not be msgpack at all (or a header promising more than follows).
    garbage = st.binary(min_size=1, max_size=64).map(lambda b: (True, b))
    return st.lists(st.one_of(packed, packed, packed, packed, packed, packed, ext, garbage),
                    min_size=1, max_size=32)


def _ext_frame(code: int, data: bytes, first: bool) -> bytes:
    """A four-element request frame with an ext value (ext 8 encoding, any type code) as
    its first element or as the ``prompt`` of a ``generate``."""
    value = b"\xc7" + bytes([len(data)]) + code.to_bytes(1, "big", signed=True) + data
    if first:
        return b"\x94" + value + msgpack.packb(1) + msgpack.packb("generate") + b"\x80"
    return (b"\x94" + msgpack.packb(0) + msgpack.packb(1) + msgpack.packb("generate")
            + b"\x81" + msgpack.packb("prompt") + value)


class FuzzConnection:
    """One connection of the fuzzer. A batch of whole msgpack values is followed by a
    sentinel ping and read until its answer (the batch is processed) or the daemon closes.
    A batch with raw bytes may leave the stream mid-frame, so the fuzzer ends its side of
    that connection and reads until the daemon closes it."""

    SENTINEL = 2**32 - 1

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = None
        self.connections = 0

    def send_batch(self, batch: list[tuple[bool, bytes]]) -> None:
        if self.sock is None:
            self.sock = raw_connect(self.path, timeout=60)
            self.reader = Reader(self.sock)
            self.connections += 1
        raw = any(is_raw for is_raw, _ in batch)
        data = b"".join(frame for _, frame in batch)
        try:
            if raw:
                self.sock.sendall(data)
                self.sock.shutdown(socket.SHUT_WR)
                while self._next() is not None:
                    pass
                self._close()
                return
            self.sock.sendall(data + msgpack.packb([0, self.SENTINEL, "ping", {}]))
            while True:
                frame = self._next()
                if frame is None:  # closed after a nil-id error: a fresh connection next
                    self._close()
                    return
                if isinstance(frame, list) and len(frame) == 4 and frame[1] == self.SENTINEL:
                    return
        except (BrokenPipeError, ConnectionResetError):
            self._close()

    def _next(self) -> Any:
        try:
            return self.reader.next()
        except (msgpack.ExtraData, ValueError, ConnectionResetError):
            return None

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def fuzz(table: Table, work: Path, frames_goal: int) -> None:
    from hypothesis import HealthCheck, Phase, given, seed, settings

    section(f"fuzz: {frames_goal} frames at a daemon")
    daemon = Daemon(work / "fuzz", config=FUZZ_CONFIG).start()
    conn = FuzzConnection(daemon.socket)
    sent = [0]
    rss: dict[str, int] = {}
    t0 = time.monotonic()
    batches = frame_strategies()

    def send(batch: list[tuple[bool, bytes]]) -> None:
        if sent[0] >= frames_goal:
            return
        conn.send_batch(batch)
        sent[0] += len(batch)
        if "start" not in rss and sent[0] >= min(5000, frames_goal // 10):
            rss["start"] = rss_bytes(daemon.proc.pid)  # after the warm-up
        if sent[0] // 10000 != (sent[0] - len(batch)) // 10000:
            print(f"  {sent[0]} frames, {conn.connections} connections, "
                  f"RSS {rss_bytes(daemon.proc.pid) / 2**20:.0f} MiB "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)

    alive = False
    try:
        # Rounds of examples, each from its own seed (so a run is reproducible), until the
        # goal; hypothesis may end a round early.
        for round_no in range(10_000):
            if sent[0] >= frames_goal or time.monotonic() - t0 > 3600:
                break
            run = seed(round_no)(settings(
                max_examples=max(100, (frames_goal - sent[0]) // 16 + 1), deadline=None,
                database=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck))(given(batches)(send)))
            run()
        rss["end"] = rss_bytes(daemon.proc.pid)
        with Client(daemon.socket) as c:
            alive = bool(c.ping())
    finally:
        code = daemon.stop()
    log = daemon.log()
    tracebacks = log.count("Traceback")
    growth = (rss["end"] - rss["start"]) / rss["start"] if rss.get("start") else float("nan")
    seconds = time.monotonic() - t0
    table.figures["fuzz"] = {"frames": sent[0], "connections": conn.connections,
                             "seconds": round(seconds, 1), "alive": alive, "exit": code,
                             "tracebacks": tracebacks, "rss_start": rss.get("start"),
                             "rss_end": rss.get("end"), "rss_growth": growth}
    table.add("fuzzed frames: daemon alive, tracebacks",
              f"{sent[0]} frames on {conn.connections} connections in {seconds:.0f} s: "
              f"{'alive' if alive else 'DEAD'}, exit {code}, {tracebacks} tracebacks",
              f"≥ {frames_goal:,} frames, alive, 0", alive and code == 0 and tracebacks == 0
              and sent[0] >= frames_goal)
    table.add("fuzzed frames: RSS growth",
              f"{growth * 100:+.1f}% ({rss.get('start', 0) / 2**20:.0f} → "
              f"{rss.get('end', 0) / 2**20:.0f} MiB)", "< 10%", growth < 0.10)


# -- load -----------------------------------------------------------------------------------


def load(table: Table, work: Path, clients: int = 16, seconds: float = 20.0) -> None:
    section(f"load: {clients} clients pinging while two generate, {seconds:.0f} s")
    daemon = Daemon(work / "load").start()
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[str] = []
    generated = [0]
    lock = threading.Lock()

    def pinger() -> None:
        with Client(daemon.socket) as c:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    c.ping()
                except Exception as exc:  # noqa: BLE001 - counted
                    errors.append(repr(exc))
                    continue
                with lock:
                    latencies.append((time.perf_counter() - t) * 1e3)
                time.sleep(0.01)

    def generator(n: int) -> None:
        with Client(daemon.socket) as c:
            i = 0
            while not stop.is_set():
                c.generate(f"a {['red', 'blue', 'green'][i % 3]} shape number {n}-{i} over "
                           f"{['a grassy field', 'the sea', 'a desert'][i % 3]}")
                generated[0] += 1
                i += 1

    threads = [threading.Thread(target=pinger) for _ in range(clients)]
    threads += [threading.Thread(target=generator, args=(n,)) for n in range(2)]
    try:
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join(120)
    finally:
        code = daemon.stop()
    lat = sorted(latencies)
    p50 = statistics.median(lat)
    p99 = lat[int(0.99 * (len(lat) - 1))]
    load_avg = os.getloadavg()[0]
    table.figures["load"] = {"clients": clients, "pings": len(lat), "p50_ms": p50,
                             "p99_ms": p99, "max_ms": lat[-1], "generations": generated[0],
                             "errors": errors[:5], "loadavg_1m": load_avg, "exit": code}
    table.add(f"{clients} clients pinging beside 2 generating: ping latency",
              f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {lat[-1]:.0f} ms over {len(lat)} "
              f"pings; {generated[0]} videos; {len(errors)} errors (load {load_avg:.1f})",
              "no errors", not errors and code == 0)


# -- admission ------------------------------------------------------------------------------


def admission(table: Table, work: Path) -> None:
    section("admission: the oversized request and a deadline inside a long step")
    daemon = Daemon(work / "admission").start()
    try:
        with Client(daemon.socket) as c:
            refused = []
            for _ in range(10):
                t = time.perf_counter()
                try:
                    c.generate("a red circle", cache="off", steps=1, frames=256, height=1024,
                               width=1024)
                    refused.append(float("inf"))
                except RpcError as exc:
                    assert exc.code == "too_large", exc
                    refused.append((time.perf_counter() - t) * 1e3)
            # 200 steps of 16×512² take minutes: refused at admission against the deadline.
            t = time.perf_counter()
            try:
                c.generate("too slow", cache="off", steps=200, frames=16, height=512,
                           width=512, deadline_s=5.0)
                early = float("inf")
            except RpcError as exc:
                assert exc.code == "deadline_exceeded" and exc.data["steps_done"] == 0, exc
                early = (time.perf_counter() - t) * 1e3
            # One step of 64×512² takes seconds: deadlines at 0.7-0.9 of its estimate are
            # admitted (within the 1.5x slack) and must stop the step between blocks.
            big = {"cache": "off", "steps": 1, "frames": 64, "height": 512, "width": 512}
            try:
                c.generate("probe", deadline_s=0.01, **big)
            except RpcError as exc:
                estimate = exc.data["estimated_s"]
            overshoot = []
            for share in (0.7, 0.8, 0.9):
                deadline = estimate * share
                t = time.perf_counter()
                try:
                    c.generate("too slow", deadline_s=deadline, **big)
                    overshoot.append(float("inf"))
                except RpcError as exc:
                    assert exc.code == "deadline_exceeded", exc
                    overshoot.append(time.perf_counter() - t - deadline)
            assert c.ping()
    finally:
        code = daemon.stop()
    table.figures["admission"] = {"refused_ms": refused, "deadline_refused_ms": early,
                                  "step_estimate_s": estimate,
                                  "deadline_overshoot_s": overshoot}
    table.add("oversized request (256×1024², 1 step) refused",
              f"max {max(refused):.1f} ms over 10 (median {statistics.median(refused):.1f})",
              "< 100 ms", max(refused) < 100 and code == 0)
    table.add("a deadline its cheapest run cannot meet (200 steps of 16×512², 5 s)",
              f"refused in {early:.1f} ms, nothing run", "< 100 ms", early < 100)
    table.add(f"deadline inside a long step (64×512², step estimated {estimate:.1f} s; "
              "deadlines at 0.7, 0.8, 0.9 of it)",
              "answered " + ", ".join(f"{o:+.2f}" for o in overshoot) + " s after it",
              "within 2 s", max(overshoot) < 2.0)


# -- faults ---------------------------------------------------------------------------------


def _flip(path: Path, blob: bytes) -> bool:
    """Flip one bit in the middle of every copy of ``blob`` in the file (LMDB leaves stale
    copies of rewritten pages behind; the live one must be among those damaged)."""
    data = path.read_bytes()
    places = []
    at = data.find(blob)
    while at >= 0:
        places.append(at + len(blob) // 2)
        at = data.find(blob, at + 1)
    fd = os.open(path, os.O_WRONLY)
    try:
        for where in places:
            os.pwrite(fd, bytes([data[where] ^ 0x40]), where)
    finally:
        os.close(fd)
    return bool(places)


def faults(table: Table, work: Path, entries: int = 6) -> None:
    section(f"faults: {entries} damaged entries under a running daemon; damaged files")
    daemon = Daemon(work / "faults").start()
    places = ["a grassy field", "the sea", "a desert", "a snowy mountain", "a dark cave",
              "a city street", "a forest", "the night sky"][:entries]
    served_damaged = hits_on_damaged = quarantined = kept_entries = 0
    try:
        with Client(daemon.socket) as c:
            ids = [c.generate(f"a {obj} over {p}").inserted["entry_id"]
                   for obj, p in zip(_OBJECTS, places, strict=False)]
            db = LatentDB(daemon.data_dir, readonly=True)
            try:
                with db.read() as txn:
                    blobs = [bytes(txn.get(latent_key(i, db.get_record(txn, i).steps[0]),
                                           db=db.latents)) for i in ids]
            finally:
                db.close()
            flipped = sum(_flip(daemon.data_dir / "lmdb" / "data.mdb", b) for b in blobs)
            for obj, p in zip(_OBJECTS[::-1], places, strict=False):
                before = c.stats()["cache"]["quarantined"]
                got = c.generate(f"a {obj} made of glass over {p}")
                if c.stats()["cache"]["quarantined"] > before:
                    hits_on_damaged += 1
                elif got.cache == "hit" and got.matched.entry_id in ids:
                    hits_on_damaged += 1
                    served_damaged += 1
            stats = c.stats()["cache"]
            quarantined, kept_entries = stats["quarantined"], stats["entries"]
    finally:
        code = daemon.stop()
    table.figures["faults"] = {"entries": entries, "flipped": flipped,
                               "hits_on_damaged": hits_on_damaged,
                               "served_damaged": served_damaged, "quarantined": quarantined}
    table.add("damaged latents under a running daemon",
              f"{flipped} damaged, {hits_on_damaged} requests matched one: {served_damaged} "
              f"served from it, {quarantined} quarantined (run as misses); exit {code}",
              "0 served", served_damaged == 0 and quarantined >= 1 and code == 0)

    # A truncated store and a damaged tree: refused at start with one line, then salvaged.
    env = {**os.environ, **BASE_ENV, "PYTHONPATH": str(REPO)}
    for name, damage in (("truncated data.mdb", _truncate), ("zeroed tree page", _zero_leaf)):
        copy = work / f"faults-{name.split()[0]}"
        shutil.copytree(daemon.data_dir, copy)
        what = damage(copy / "lmdb" / "data.mdb")
        t = time.perf_counter()
        serve = subprocess.run([*CHAID, "serve", "--model", "tiny-test", "--socket",
                                str(copy / "s.sock"), "--data-dir", str(copy)],
                               capture_output=True, text=True, env=env, timeout=300)
        took = time.perf_counter() - t
        last = (serve.stderr.strip().splitlines() or [""])[-1]
        repair = subprocess.run([*CHAID, "cache", "check", "--repair", "--json",
                                 "--data-dir", str(copy)], capture_output=True, text=True,
                                env=env, timeout=300)
        report = json.loads(repair.stdout) if repair.returncode == 0 else {}
        ok = serve.returncode == 65 and "Traceback" not in serve.stderr and \
            "--repair" in last and repair.returncode == 0
        table.figures[f"faults_{name}"] = {"damage": what, "serve_exit": serve.returncode,
                                           "serve_s": round(took, 1), "message": last,
                                           "repair": report}
        table.add(f"{name} ({what})",
                  f"serve exits {serve.returncode} in {took:.1f} s with one line; repair kept "
                  f"{report.get('entries', '?')} of {kept_entries} entries",
                  "exit 65, one line, repaired", ok)


# One object per prompt: two prompts of the faults section share only their place.
_OBJECTS = ["red circle", "blue square", "green triangle", "purple hexagon", "orange star",
            "yellow oval", "white cross", "black ring"]


def _truncate(path: Path) -> str:
    size = path.stat().st_size
    os.truncate(path, size - 8192)
    return f"{size} → {size - 8192} bytes"


def _zero_leaf(path: Path) -> str:
    """Zero the newest live leaf page (stale copies of replaced pages are skipped: zeroing
    one must make ``chaid cache check`` find damage)."""
    import struct

    data = path.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for pgno in range(len(data) // 4096 - 1, 1, -1):
        page = data[pgno * 4096:(pgno + 1) * 4096]
        flags, lower = struct.unpack_from("<HH", page, 10)
        if flags != 0x02 or lower <= 16:
            continue
        with open(path, "r+b") as f:
            f.seek(pgno * 4096)
            f.write(bytes(4096))
        check = subprocess.run([*CHAID, "cache", "check", "--json", "--data-dir",
                                str(path.parents[1])], capture_output=True, text=True, env=env)
        if check.returncode == 1 and json.loads(check.stdout)["damaged"]:
            return f"leaf page {pgno} of {len(data) // 4096}"
        with open(path, "r+b") as f:
            f.seek(pgno * 4096)
            f.write(page)
    return "no live leaf found"


SECTIONS: dict[str, Callable[..., None]] = {
    "writer-kills": writer_kills, "daemon-kills": daemon_kills, "fuzz": fuzz,
    "load": load, "admission": admission, "faults": faults}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200, help="writer SIGKILLs")
    parser.add_argument("--daemon-kills", type=int, default=5, help="daemon SIGKILLs")
    parser.add_argument("--frames", type=int, default=100_000, help="fuzzed frames")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append",
                        help="run only these sections")
    parser.add_argument("--json", type=Path, default=REPO / "out" / "stress.json")
    args = parser.parse_args()
    os.environ.update(BASE_ENV)
    work = Path(tempfile.mkdtemp(prefix="chaid-stress-"))
    table = Table()
    started = time.monotonic()
    chosen = args.only or list(SECTIONS)
    try:
        for name in chosen:
            fn = SECTIONS[name]
            if name == "writer-kills":
                fn(table, work, args.kills)
            elif name == "daemon-kills":
                fn(table, work, args.daemon_kills)
            elif name == "fuzz":
                fn(table, work, args.frames)
            else:
                fn(table, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    minutes = (time.monotonic() - started) / 60
    print(f"\nchaid stress: {', '.join(chosen)} in {minutes:.1f} min on {os.cpu_count()} CPUs "
          f"(load average {os.getloadavg()[0]:.1f})\n")
    print(table.render())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"sections": chosen, "minutes": round(minutes, 1),
                                     "rows": table.rows, "figures": table.figures},
                                    indent=2, default=str))
    print(f"\nfigures: {args.json}")
    return 0 if table.ok else 1


if __name__ == "__main__":
    sys.exit(main())
