"""The real daemon over a real Unix socket: CHAI modes, progress, cancel, limits, access."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
from daemonkit import LONG, Reader, as_user, call, raw_connect, send

from chai_client import AsyncClient, BusyError, Client, InvalidParams, RpcError
from chaid import protocol

pytestmark = pytest.mark.integration

RED = "a red circle moving left over a grassy field"
BLUE = "a blue square bouncing over a grassy field"


def entries(daemon) -> int:
    with Client(daemon.socket) as c:
        return c.stats()["cache"]["entries"]


def test_miss_then_hit(shared_daemon):
    with Client(shared_daemon.socket) as c:
        first = c.generate(RED)
        assert first.cache == "miss" and first.steps == 30 and first.matched is None
        assert first.video[4:8] == b"ftyp"  # an MP4
        assert first.inserted["entry_id"] >= 1
        second = c.generate(BLUE, format="frames")
        assert second.cache == "hit" and second.steps == 8
        assert second.matched.entry_id == first.inserted["entry_id"]
        assert [(e.query, e.cached) for e in second.matched.entities] == [
            ("grassy field", "grassy field")]
        assert second.video.shape == (second.frames, second.height, second.width, 3)
        off = c.generate(BLUE, cache="off", steps=3)
        assert (off.cache, off.steps, off.inserted) == ("off", 3, None)
        lookup = c.lookup("a grassy field at dawn")
        assert lookup.hit and lookup.entry_id == first.inserted["entry_id"]


def test_chai_cli_json(shared_daemon, tmp_path):
    env = {**os.environ, "CHAI_SOCKET": str(shared_daemon.socket)}
    out = tmp_path / "v.mp4"
    run = subprocess.run(
        [sys.executable, "-m", "chai_client.cli", "generate", "a green triangle in a desert",
         "-o", str(out), "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    facts = json.loads(run.stdout)
    assert facts["cache"] == "miss" and facts["steps"] == 30 and facts["matched"] is None
    assert facts["timings"]["total_ms"] > 0 and out.stat().st_size > 100
    assert facts["timings"]["lookup_ms"] > 0 and facts["timings"]["repeat_ms"] >= 0
    run = subprocess.run(
        [sys.executable, "-m", "chai_client.cli", "generate", "a yellow star in a desert",
         "-o", str(out), "--json"], env=env, capture_output=True, text=True, timeout=120)
    facts = json.loads(run.stdout)
    assert facts["cache"] == "hit" and facts["steps"] == 8
    assert facts["matched"]["entities"][0]["cached"] == "desert"
    for args in (["stats"], ["lookup", "a desert"], ["cache", "ls"], ["ping"]):
        run = subprocess.run([sys.executable, "-m", "chai_client.cli", *args], env=env,
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, (args, run.stderr)


def test_progress_notifications(shared_daemon):
    seen = []
    with Client(shared_daemon.socket) as c:
        result = c.generate("a red circle", cache="off", steps=5,
                            on_progress=lambda step, steps: seen.append((step, steps)))
    assert result.steps == 5
    assert seen == [(k, 5) for k in range(1, 6)]


def test_cancel_stops_within_a_step(shared_daemon):
    with raw_connect(shared_daemon.socket) as s:
        reader = Reader(s)
        send(s, "generate", {"prompt": "a long one", "cache": "off", "steps": 200,
                             "progress": True, **LONG}, msgid=7)
        first = reader.next()
        assert first[0] == 2 and first[1] == "progress" and first[2]["request_id"] == 7
        send(s, "cancel", {"request_id": 7}, msgid=8)
        frames = []
        while True:
            frame = reader.next()
            frames.append(frame)
            if frame[0] == 1 and frame[1] == 7:
                break
        cancel_reply = next(f for f in frames if f[0] == 1 and f[1] == 8)
        assert cancel_reply[2] is None and cancel_reply[3]["cancelled"]
        error = frames[-1][2]
        assert error["code"] == "cancelled"
        # Progress after the cancel was answered: at most the step already running.
        after = frames[frames.index(cancel_reply) + 1:-1]
        assert len(after) <= 1, frames
        assert error["data"]["steps_done"] < 20
        assert call(s, "cancel", {"request_id": 7}, msgid=9)[2]["code"] == "not_found"


def _stats(daemon) -> dict:
    with Client(daemon.socket) as c:
        return c.stats()


def test_disconnect_cancels(shared_daemon):
    before = _stats(shared_daemon)["generations"]["cancelled"]
    s = raw_connect(shared_daemon.socket)
    reader = Reader(s)
    send(s, "generate", {"prompt": "abandoned", "cache": "off", "steps": 200,
                         "progress": True, **LONG})
    assert reader.next()[1] == "progress"
    s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = _stats(shared_daemon)
        if stats["generations"]["cancelled"] > before and stats["queue"]["running"] is None:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"job still running after the client left: {stats}")


def test_busy_when_queue_full(shared_daemon):
    # One running + queue_size (16) waiting; the next is refused at once.
    socks = []
    try:
        for i in range(17):
            s = raw_connect(shared_daemon.socket)
            send(s, "generate", {"prompt": f"filler {i}", "cache": "off", "steps": 200,
                                 **LONG})
            socks.append(s)
        deadline = time.monotonic() + 20
        while _stats(shared_daemon)["queue"]["queued"] < 16:  # all arrived and queued
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(BusyError) as err:
            with Client(shared_daemon.socket) as c:
                c.generate("one too many", cache="off", steps=1)
        assert err.value.code == "busy"
        with Client(shared_daemon.socket) as c:  # ping is never queued
            assert c.ping()["pong"]
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 15
    while _stats(shared_daemon)["queue"]["running"] is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_ping_stays_fast_during_generation_and_16_concurrent_clients(shared_daemon):
    results, errors = [], []

    def worker(i: int) -> None:
        try:
            with Client(shared_daemon.socket) as c:
                results.append(c.generate(f"a shape number {i} over a snowy mountain",
                                          format="frames"))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    pings = []
    with Client(shared_daemon.socket) as c:
        while any(t.is_alive() for t in threads):
            t0 = time.perf_counter()
            c.ping()
            pings.append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.005)
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 16
    # The first to reach the device misses; the rest share "snowy mountain" and hit.
    assert sum(r.cache == "hit" for r in results) >= 14
    pings.sort()
    p50, p99 = pings[len(pings) // 2], pings[int(len(pings) * 0.99)]
    print(f"ping during 16 generations: n={len(pings)} p50={p50:.2f} ms p99={p99:.2f} ms")
    assert p50 < 50, pings


def test_async_client_under_asyncio_and_trio(shared_daemon):
    import asyncio

    import trio

    async def use(seed: int) -> tuple:
        client = AsyncClient(shared_daemon.socket)
        pong = await client.ping()
        result = await client.generate("a red circle", cache="off", steps=2, seed=seed)
        return pong["pong"], result.steps, result.cache

    assert asyncio.run(use(1)) == (True, 2, "off")
    assert trio.run(use, 2) == (True, 2, "off")
    assert trio.run(use, 1) == (True, 0, "repeat")  # asyncio's request again: replayed

    async def cancelled_by_timeout() -> None:
        client = AsyncClient(shared_daemon.socket)
        with trio.move_on_after(0.5):
            await client.generate("cancel me", cache="off", steps=200, **LONG)
        # The disconnect cancels the job: the device is free again soon.
        with trio.fail_after(10):
            while (await client.stats())["queue"]["running"] is not None:
                await trio.sleep(0.05)

    trio.run(cancelled_by_timeout)


# -- hostile and malformed input -----------------------------------------------------------


def _error_of(sock, payload: bytes):
    sock.sendall(payload)
    return Reader(sock).next()


@pytest.mark.parametrize("payload, code", [
    (b"\xc1\xc1\xc1garbage", "malformed"),  # 0xc1 is never valid msgpack
    # Headers claiming more than a frame may hold: refused at once, or (a bin header
    # waits for its bytes) at the read deadline.
    (b"\xc6\x7f\xff\xff\xff", "timeout"),  # bin32 claiming 2 GB
    (b"\xdd\xff\xff\xff\xff", "malformed"),  # array32 claiming 4 billion items
    (b"\x91" * 5000 + b"\x00", "malformed"),  # nesting 5000 deep
    (msgpack.packb([1, 2, None, None]), "malformed"),  # a response, not a request
    (msgpack.packb("hello"), "malformed"),
    # An array (the ext type) where the frame kind goes.
    (protocol.packb([np.zeros(2, np.int8), 1, "ping", {}]), "malformed"),
    (protocol.packb([np.zeros((), np.int64), 1, "ping", {}]), "malformed"),
])
def test_bad_frames_get_an_error(shared_daemon, payload, code):
    """A nil-id answer, then the connection closes (docs/protocol.md)."""
    with raw_connect(shared_daemon.socket) as s:
        reader = Reader(s)
        s.sendall(payload)
        frame = reader.next()
        assert frame[0] == 1 and frame[1] is None and frame[2]["code"] == code, frame
        assert frame[2]["message"]
        assert reader.next() is None


def test_oversized_frame_closes_connection(shared_daemon):
    with raw_connect(shared_daemon.socket) as s:
        payload = msgpack.packb([0, 1, "generate", {"prompt": "x" * (2 << 20)}])
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        frame = Reader(s).next()
        assert frame[2]["code"] == "too_large"


def test_stalled_frame_times_out(shared_daemon):
    with raw_connect(shared_daemon.socket) as s:
        whole = msgpack.packb([0, 1, "ping", {}])
        t0 = time.monotonic()
        frame = _error_of(s, whole[:3])
        assert frame[2]["code"] == "timeout"
        assert 0.5 < time.monotonic() - t0 < 5
        assert Reader(s).next() is None  # closed


@pytest.mark.parametrize("method, params, code", [
    ("nope", {}, "unknown_method"),
    ("generate", {}, "invalid_params"),
    ("generate", {"prompt": 5}, "invalid_params"),
    ("generate", {"prompt": "x" * 5000}, "invalid_params"),
    ("generate", {"prompt": "ok", "frames": 100000}, "invalid_params"),
    ("generate", {"prompt": "ok", "frames": "4"}, "invalid_params"),
    ("generate", {"prompt": "ok", "steps": 5}, "invalid_params"),  # steps needs cache=off
    ("generate", {"prompt": "ok", "cache": "off", "steps": 10**6}, "invalid_params"),
    ("generate", {"prompt": "ok", "height": 33}, "invalid_params"),  # not a multiple of 8
    ("generate", {"prompt": "ok", "seed": -1}, "invalid_params"),
    ("generate", {"prompt": "ok", "cfg_scale": float("nan")}, "invalid_params"),
    ("generate", {"prompt": "ok", "path": "/etc/passwd"}, "invalid_params"),
    ("generate", {"prompt": "ok", "format": "gif"}, "invalid_params"),
    ("cache.evict", {"entry_ids": ["1"]}, "invalid_params"),
    ("cancel", {"request_id": "x"}, "invalid_params"),
    ("cache.list", {"limit": -1}, "invalid_params"),
])
def test_bad_requests_get_a_clear_error(shared_daemon, method, params, code):
    with raw_connect(shared_daemon.socket) as s:
        frame = call(s, method, params, msgid=42)
        assert frame[1] == 42
        assert frame[2]["code"] == code, frame
        assert call(s, "ping", msgid=43)[3]["pong"]  # the connection still serves


def test_daemon_and_cache_survive_hostile_input(shared_daemon):
    if entries(shared_daemon) == 0:  # run alone: commit one entry to keep
        with Client(shared_daemon.socket) as c:
            c.generate(RED)
    count = entries(shared_daemon)
    assert count >= 1
    rng = __import__("random").Random(0)
    for _ in range(40):
        with raw_connect(shared_daemon.socket) as s:
            try:
                s.sendall(rng.randbytes(rng.randint(1, 4000)))
                s.settimeout(2)
                Reader(s).next()
            except (OSError, ValueError):
                pass
    assert entries(shared_daemon) == count
    with Client(shared_daemon.socket) as c:
        assert c.ping()["pong"]


# -- access control -------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")
def test_peer_credentials(shared_daemon):
    nobody, daemon_uid = 65534, 1
    if entries(shared_daemon) == 0:  # run alone: give cache.clear something to clear
        with Client(shared_daemon.socket) as c:
            c.generate(RED)
    before = entries(shared_daemon)
    allowed = as_user(nobody, shared_daemon.socket, "ping", {})
    assert allowed.get("result", {}).get("pong"), allowed
    denied = as_user(daemon_uid, shared_daemon.socket, "ping", {})
    assert denied["code"] == "forbidden", denied
    # Refused at accept: a silent connection of a refused uid holds no slot.
    assert as_user(daemon_uid, shared_daemon.socket, None, {}) == [None, "forbidden", None]
    not_admin = as_user(nobody, shared_daemon.socket, "cache.clear", {})
    assert not_admin["code"] == "forbidden", not_admin
    time.sleep(5)  # refill nobody's bucket (1 request/s, bursts of 5)
    codes = as_user(nobody, shared_daemon.socket, "stats", {}, times=8)
    assert codes.count("ok") in (5, 6) and "too_many_requests" in codes, codes
    assert entries(shared_daemon) == before >= 1  # nothing was cleared


def test_admin_calls_as_owner(shared_daemon):
    with Client(shared_daemon.socket) as c:
        listed = c.cache_list()
        assert listed and {"id", "prompt", "entities", "hits"} <= set(listed[0])
        victim = listed[-1]["id"]
        out = c.cache_evict([victim, 999999])
        assert out == {"evicted": [victim], "missing": [999999]}
        with pytest.raises(InvalidParams):
            c.cache_evict([])


def test_costly_request_is_refused_before_any_work(shared_daemon):
    """Within every shape bound, but half a million tokens per forward: refused with the
    estimate (docs/protocol.md, admission by cost); the daemon's counters show it."""
    with Client(shared_daemon.socket) as c:
        before = c.stats()["admission"]
        with pytest.raises(RpcError) as err:
            c.generate("a red circle", cache="off", steps=1, frames=256, height=1024,
                       width=1024)
        assert err.value.code == "too_large", err.value
        assert err.value.data["tokens"] >= 500_000
        assert err.value.data["estimated_s"] > err.value.data["max_s"] or (
            err.value.data["memory_mb"] > err.value.data["max_memory_mb"])
        after = c.stats()["admission"]
        assert after["refused"] == before["refused"] + 1
        assert after["dit_tflops_per_s"] > 0 and c.ping()["pong"]


def test_deadline_stops_a_step_that_has_begun(shared_daemon):
    """One step of 64 frames of 512x512 takes seconds here. A deadline far below its
    estimate is refused before any work; one below the step's time but within the slack
    of the estimate is admitted, and stops the step between blocks instead of after it
    (which would return the video)."""
    big = {"cache": "off", "steps": 1, "frames": 64, "height": 512, "width": 512}
    with Client(shared_daemon.socket) as c:
        t0 = time.monotonic()
        with pytest.raises(RpcError) as err:
            c.generate("a red circle", deadline_s=0.05, **big)
        assert err.value.code == "deadline_exceeded" and err.value.data["steps_done"] == 0
        assert "nothing was run" in err.value.message and time.monotonic() - t0 < 1.0
        estimate = err.value.data["estimated_s"]
        admitted = estimate / 1.49  # the lowest deadline admitted (estimate within 1.5x)
        # The run must still be going at the deadline. The estimate comes from timings
        # taken at start-up; a run faster than the lowest admitted deadline meets it (the
        # video comes back in time, which is checked), and is tried once more, as a run's
        # time moves with the machine's load.
        for _ in range(2):
            t0 = time.monotonic()
            try:
                c.generate("a red circle", deadline_s=admitted, **big)
            except RpcError as exc:
                took = time.monotonic() - t0
                assert exc.code == "deadline_exceeded", exc
                assert "nothing was run" not in exc.message
                assert took < admitted + 2.0, (took, admitted, estimate)
                return
            took = time.monotonic() - t0
            assert took < admitted + 0.5, (took, admitted)  # met: it came back in time
        pytest.skip(f"this run ({took:.2f} s) beat the lowest deadline the estimate "
                    f"({estimate:.2f} s) admits twice; no admitted deadline falls inside it")


def test_deadline_inflight_limit_and_duplicate_ids(shared_daemon):
    with Client(shared_daemon.socket) as c:
        with pytest.raises(RpcError) as err:
            c.generate("too slow", cache="off", steps=200, deadline_s=0.3, **LONG)
        assert err.value.code == "deadline_exceeded"
        assert err.value.data["steps_done"] < 200
    with raw_connect(shared_daemon.socket) as s:
        reader = Reader(s)
        for i in range(1, 10):  # 8 may be in flight; the 9th is refused at once
            send(s, "generate", {"prompt": f"pipelined {i}", "cache": "off", "steps": 200,
                                 **LONG}, msgid=i)
        send(s, "generate", {"prompt": "same id", "cache": "off", "steps": 1}, msgid=3)
        send(s, "ping", msgid=100)
        codes = {}
        while len(codes) < 3:
            frame = reader.next()
            if frame[0] == 1:
                codes[frame[1]] = frame[2]["code"] if frame[2] else "ok"
        assert codes == {9: "too_many_requests", 3: "invalid_params", 100: "ok"}, codes
    deadline = time.monotonic() + 15
    while _stats(shared_daemon)["queue"]["running"] is not None:  # the close cancelled them
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_prompt_without_entities_and_cache_warm(shared_daemon):
    with Client(shared_daemon.socket) as c:
        result = c.generate("it")  # no noun chunk: a miss that still caches its latents
        assert result.cache == "miss" and result.entities == []
        warmed = c.cache_warm("a white circle rising over the night sky")
        assert warmed["entry_id"] is not None and warmed["steps"] == 30
        assert c.generate("a green square over the night sky").cache == "hit"


def test_connections_take_turns_at_the_device(shared_daemon):
    """One connection queues four long jobs; another's single job is served in turn, not
    behind all four (the queue is fair between clients: chaid/engine/scheduler.py)."""
    done: dict[int, float] = {}
    flood = raw_connect(shared_daemon.socket, timeout=120)
    reader = Reader(flood)

    def read_flood() -> None:
        while len(done) < 4:
            frame = reader.next()
            if frame is None:
                return
            if frame[0] == 1:
                assert frame[2] is None, frame[2]
                done[frame[1]] = time.monotonic()

    thread = threading.Thread(target=read_flood)
    thread.start()
    try:
        for i in range(1, 5):
            send(flood, "generate", {"prompt": f"flood {i}", "cache": "off", "steps": 20,
                                     **LONG}, msgid=i)
        time.sleep(0.3)
        with Client(shared_daemon.socket) as c:
            clients = c.stats()["queue"]["clients"]
            assert sum(d["queued"] for d in clients) >= 2 and all(d["uid"] == os.getuid()
                                                                   for d in clients)
            c.generate("my turn", cache="off", steps=20, **LONG)
            mine = time.monotonic()
            with pytest.raises(InvalidParams, match="priority"):
                c.generate("too urgent", cache="off", steps=1, priority=10)
        thread.join(120)
    finally:
        flood.close()
    assert len(done) == 4
    # In arrival order it would have come after all four; in turn, at most two go first
    # (the one running when it arrived, and the flood's next turn).
    assert sum(t > mine for t in done.values()) >= 2, (mine, done)
