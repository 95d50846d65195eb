"""Connection limits of the real daemon: idle timeout, per-user and global caps, a client
that never reads. One daemon for the module, with every limit small (conftest.LIMITS_CONFIG).
"""

from __future__ import annotations

import asyncio
import math
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from daemonkit import LONG, Reader, as_user, call, raw_connect, send

from chai_client import AsyncClient, BusyError, Client
from chaid.server.connection import OUTGOING_BYTES

pytestmark = pytest.mark.integration

# Mirrors conftest.LIMITS_CONFIG.
IDLE_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 10
MAX_PER_USER = 3
MAX_INFLIGHT = 4
NOBODY, BIN = 65534, 2
# Bytes of one raw LONG video on the wire (uint8 frames; the header is a few bytes more).
LONG_FRAME_BYTES = LONG["frames"] * LONG["height"] * LONG["width"] * 3


def _refusal(sock) -> dict[str, Any]:
    """The nil-id error frame a refused or closed connection gets; asserts the close."""
    reader = Reader(sock)
    frame = reader.next()
    assert frame is not None and frame[0] == 1 and frame[1] is None, frame
    assert reader.next() is None  # then the daemon closes the connection
    return frame[2]


def _connections(daemon) -> int:
    with Client(daemon.socket, timeout=10) as c:
        return c.stats()["connections"] - 1  # not counting this one


def _wait_for_connections(daemon, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (n := _connections(daemon)) != count:
        assert time.monotonic() < deadline, f"{n} connections open, expected {count}"
        time.sleep(0.05)


# -- idle timeout --------------------------------------------------------------------------


def test_idle_connections_close_but_not_while_a_request_runs(limits_daemon):
    client = Client(limits_daemon.socket, timeout=30)
    assert client.ping()["pong"]  # its connection goes idle first
    with raw_connect(limits_daemon.socket) as idle, raw_connect(limits_daemon.socket) as busy:
        assert call(idle, "ping")[3]["pong"]
        t_idle = time.monotonic()
        # A generation that outlasts the idle timeout keeps its connection open.
        send(busy, "generate", {"prompt": "a slow one", "cache": "off", "steps": 60,
                                "format": "frames", **LONG}, msgid=3)
        t_busy = time.monotonic()

        error = _refusal(idle)
        waited = time.monotonic() - t_idle
        assert error["code"] == "timeout" and error["data"] == {"idle_timeout_s": 2.0}, error
        assert IDLE_TIMEOUT_S - 0.5 < waited < IDLE_TIMEOUT_S + 4, waited
        # The reference client reconnects by itself after its idle connection was closed.
        assert client.ping()["pong"]
        client.close()

        reader = Reader(busy)
        answer = reader.next()
        answered = time.monotonic()
        assert answer[1] == 3 and answer[2] is None, answer[2]
        assert answered - t_busy > IDLE_TIMEOUT_S, "the generation was too quick to tell"
        # Answered: the idle clock starts again from the response.
        error = _refusal(busy)
        assert error["code"] == "timeout"
        assert IDLE_TIMEOUT_S - 0.5 < time.monotonic() - answered < IDLE_TIMEOUT_S + 4


# -- connection caps -----------------------------------------------------------------------


def test_global_connection_cap_refuses_then_recovers(limits_daemon):
    _wait_for_connections(limits_daemon, 0)
    held = []
    try:
        # root is exempt from the per-user cap, so only the daemon-wide one applies.
        for i in range(MAX_CONNECTIONS):
            s = raw_connect(limits_daemon.socket)
            held.append(s)
            assert call(s, "ping", msgid=i)[3]["pong"]
        with raw_connect(limits_daemon.socket) as extra:
            error = _refusal(extra)
        assert error["code"] == "busy" and error["data"] == {"max_connections": 10}, error
        assert "too many connections" in error["message"]
        with pytest.raises(BusyError) as err, Client(limits_daemon.socket, timeout=10) as c:
            c.ping()
        assert err.value.code == "busy"
        ping = AsyncClient(limits_daemon.socket).ping
        for run in (lambda: asyncio.run(ping()), lambda: trio.run(ping)):
            with pytest.raises(BusyError) as err:  # the async client reads the refusal too
                run()
            assert err.value.code == "busy"
        # Served again as soon as connections close.
        for s in held[:2]:
            s.close()
        held = held[2:]
        deadline = time.monotonic() + 10
        while True:
            try:
                with Client(limits_daemon.socket, timeout=10) as c:
                    assert c.ping()["pong"]
                break
            except BusyError:
                assert time.monotonic() < deadline, "still refused after connections closed"
                time.sleep(0.02)
        assert all(call(s, "ping", msgid=99)[3]["pong"] for s in held)  # held ones still serve
    finally:
        for s in held:
            s.close()


def _write_msg(fd: int, value: Any) -> None:
    data = msgpack.packb(value)
    os.write(fd, struct.pack("I", len(data)) + data)


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        assert chunk, "the child process died"
        data += chunk
    return data


def _read_msg(fd: int) -> Any:
    (n,) = struct.unpack("I", _read_exact(fd, 4))
    return msgpack.unpackb(_read_exact(fd, n))


def _hold_connections(path: Path, report: int, release: int) -> None:
    """Child as an ordinary user: fill its share, report, hold until released, reconnect."""
    held = [raw_connect(path, timeout=10) for _ in range(MAX_PER_USER)]
    pongs = [call(s, "ping", msgid=i)[3]["pong"] for i, s in enumerate(held)]
    with raw_connect(path, timeout=10) as extra:
        error = _refusal(extra)
    try:
        with Client(path, timeout=10) as c:
            c.ping()
        client_code = "ok"
    except BusyError as exc:
        client_code = exc.code
    _write_msg(report, {"pongs": pongs, "error": error, "client": client_code})
    _read_exact(release, 1)  # the parent checks other users meanwhile
    for s in held:
        s.close()
    deadline = time.monotonic() + 10
    while True:  # its share comes back once the daemon has seen the closes
        try:
            with Client(path, timeout=10) as c:
                _write_msg(report, {"after_close": c.ping()["pong"]})
                return
        except BusyError:
            if time.monotonic() > deadline:
                _write_msg(report, {"after_close": False})
                return
            time.sleep(0.02)


def _fork_as(uid: int, fn, *args) -> tuple[int, int, int]:
    """Run ``fn(*args, report_fd, release_fd)`` in a child as ``uid``; (pid, report, release)."""
    report_r, report_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(report_r)
            os.close(release_w)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fn(*args, report_w, release_r)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            _write_msg(report_w, {"child_error": repr(exc)})
        finally:
            os._exit(0)
    os.close(report_w)
    os.close(release_r)
    return pid, report_r, release_w


def _ping_as(uid: int, path: Path) -> Any:
    def ping(path: Path, report: int, release: int) -> None:
        with raw_connect(path, timeout=10) as s:
            frame = call(s, "ping")
        _write_msg(report, frame[2] or frame[3])

    pid, report, release = _fork_as(uid, ping, path)
    try:
        return _read_msg(report)
    finally:
        os.close(report)
        os.close(release)
        os.waitpid(pid, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")
def test_per_user_connection_cap(limits_daemon):
    path = limits_daemon.socket
    pid, report, release = _fork_as(NOBODY, _hold_connections, path)
    try:
        first = _read_msg(report)
        assert "child_error" not in first, first
        assert first["pongs"] == [True] * MAX_PER_USER
        error = first["error"]
        assert error["code"] == "too_many_connections", error
        assert error["data"] == {"max_connections_per_user": MAX_PER_USER}
        assert f"uid {NOBODY}" in error["message"]
        assert first["client"] == "too_many_connections"  # the client raises it as BusyError
        # While nobody holds its share, other users still connect.
        assert _ping_as(BIN, path).get("pong"), "another user was refused"
        with Client(path, timeout=10) as c:  # root: exempt
            assert c.ping()["pong"]
        os.write(release, b"x")
        assert _read_msg(report) == {"after_close": True}
    finally:
        os.close(report)
        os.close(release)
        os.waitpid(pid, 0)


# -- a client that never reads ---------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_client_that_never_reads_is_dropped_without_blocking_others(limits_daemon):
    daemon = limits_daemon
    pid = daemon.proc.pid
    raw = {"prompt": "a large raw result", "cache": "off", "steps": 1, "format": "frames",
           **LONG}
    with Client(daemon.socket, timeout=30) as c:
        c.generate(**raw)  # warm the allocator for results of this size
        done_before = c.stats()["generations"]["off"]
    rss_before = _rss_bytes(pid)
    log_before = len(daemon.log())

    slow = raw_connect(daemon.socket)
    stop = threading.Event()

    def flood() -> None:  # keeps asking for large results and never reads one
        msgid = 0
        while not stop.is_set():
            try:
                for _ in range(MAX_INFLIGHT):
                    msgid += 1
                    send(slow, "generate", raw, msgid=msgid)
            except OSError:
                return  # dropped by the daemon
            time.sleep(0.1)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    pings, rss_peak = [], rss_before
    try:
        with Client(daemon.socket, timeout=10) as c:
            deadline = time.monotonic() + 30
            while "client not reading" not in daemon.log()[log_before:]:
                assert time.monotonic() < deadline, "the stalled client was never dropped"
                t0 = time.perf_counter()
                assert c.ping()["pong"]
                pings.append((time.perf_counter() - t0) * 1e3)
                rss_peak = max(rss_peak, _rss_bytes(pid))
                time.sleep(0.02)
            done = c.stats()["generations"]["off"] - done_before
    finally:
        stop.set()
        flooder.join(10)
        slow.close()
    pings.sort()
    p50, worst = pings[len(pings) // 2], pings[-1]
    growth = rss_peak - rss_before
    print(f"stalled client: {done} results made for it, daemon RSS +{growth / 2**20:.1f} MiB, "
          f"ping n={len(pings)} p50={p50:.2f} ms max={worst:.1f} ms")
    # Others are answered at once while the stalled connection waits out its write timeout.
    assert len(pings) > 20 and p50 < 50 and worst < 1000, pings
    # Work for the stalled client stops once its outbox is full: what is in flight, what
    # the byte budget admits, and the frame being written; not one result per request.
    bound = MAX_INFLIGHT + math.ceil(OUTGOING_BYTES / LONG_FRAME_BYTES) + 1
    assert done <= bound + 1, (done, bound)
    # Memory: those results (raw and packed) and no more, with room for allocator noise.
    assert growth < 2 * (bound + 1) * LONG_FRAME_BYTES + 32 * 2**20, growth
    with Client(daemon.socket, timeout=10) as c:
        assert c.ping()["pong"]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching uid needs root")
def test_prompts_are_private_when_not_shared(limits_daemon):
    """share_prompts = false: each user lists only the entries its misses made, and a hit
    on another user's entry names neither its prompt nor its entities; admins see all.
    The cache itself stays shared (the hit happens)."""
    nobody, bin_uid = 65534, 2
    secret = "a crimson octagon drifting over a frozen lake"
    made = as_user(nobody, limits_daemon.socket, "generate", {"prompt": secret})
    entry = made["result"]["inserted"]["entry_id"]
    own = as_user(nobody, limits_daemon.socket, "cache.list", {})["result"]
    assert [e["prompt"] for e in own["entries"]] == [secret] and own["total"] == 1

    other = as_user(bin_uid, limits_daemon.socket, "generate",
                    {"prompt": "a teal circle over a frozen lake", "format": "frames"})
    matched = other["result"]["matched"]
    assert other["result"]["cache"] == "hit" and matched["entry_id"] == entry
    assert matched["prompt"] is None and {e["cached"] for e in matched["entities"]} == {None}
    looked = as_user(bin_uid, limits_daemon.socket, "cache.lookup",
                     {"prompt": "a frozen lake at dawn"})["result"]
    assert looked["hit"] and looked["entry_id"] == entry and looked["cached_prompt"] is None
    assert {m["cached"] for m in looked["matches"]} == {None}
    listed = as_user(bin_uid, limits_daemon.socket, "cache.list", {})["result"]
    assert listed == {"entries": [], "total": 0}

    with Client(limits_daemon.socket) as c:  # root: an admin
        assert secret in [e["prompt"] for e in c.cache_list()]
        assert c.lookup("a frozen lake at dawn").cached_prompt == secret
