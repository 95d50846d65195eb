"""Server pieces without a daemon: sd_notify, access policy, socket binding."""

from __future__ import annotations

import os
import socket
import stat
import time

import pytest
import trio
import trio.testing

from chaid.server.listeners import ListenerError, bind_socket, inherited_sockets, release
from chaid.server.outbox import Outbox
from chaid.server.peercred import (
    AccessPolicy,
    PeerCredentials,
    RateLimiter,
    peer_credentials,
)
from chaid.server.sdnotify import Notifier, extend_start_while


def test_notify_never_blocks_on_a_full_queue(tmp_path):
    path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))  # never read: its queue fills up
    notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
    assert notifier.enabled and notifier.watchdog_s == 1.0
    t0 = time.perf_counter()
    for _ in range(2000):
        notifier.watchdog()
    assert time.perf_counter() - t0 < 5
    assert listener.recv(100) == b"WATCHDOG=1"
    assert not Notifier({}).enabled
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).address == "\0abstract"
    assert Notifier({"WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}).watchdog_s is None


def test_the_start_timeout_is_extended_while_loading_lasts_and_no_longer(tmp_path):
    path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.setblocking(False)
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})

    def received() -> list[bytes]:
        out = []
        while True:
            try:
                out.append(listener.recv(100))
            except BlockingIOError:
                return out

    # a load that outlasts the cap: a request every 20 s, the last one for what is left
    trio.run(extend_start_while, notifier, 60.0, 200.0,
             clock=trio.testing.MockClock(autojump_threshold=0))
    got = received()
    assert got[0] == b"EXTEND_TIMEOUT_USEC=60000000" and len(got) == 10
    assert got[-1] == b"EXTEND_TIMEOUT_USEC=20000000"

    # a load done after 30 s: the requests stop with it
    async def load_for_30_s() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(extend_start_while, notifier, 60.0, 200.0)
            await trio.sleep(30)
            nursery.cancel_scope.cancel()

    trio.run(load_for_30_s, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(received()) == 2


def _peer(uid: int, *groups: int) -> PeerCredentials:
    return PeerCredentials(pid=1, uid=uid, gid=groups[0] if groups else uid,
                           groups=frozenset(groups or (uid,)))


def test_access_policy():
    open_policy = AccessPolicy.from_names([], [], [], [], owner_uid=500)
    assert open_policy.allows(_peer(1234)) and not open_policy.is_admin(_peer(1234))
    assert open_policy.is_admin(_peer(0)) and open_policy.is_admin(_peer(500))
    policy = AccessPolicy.from_names(["1000"], ["2000"], ["1000"], ["3000"], owner_uid=500)
    assert policy.allows(_peer(1000)) and policy.is_admin(_peer(1000))
    assert policy.allows(_peer(1001, 7, 2000)) and not policy.is_admin(_peer(1001, 2000))
    assert not policy.allows(_peer(1002, 3000))
    assert not policy.is_admin(_peer(1002, 3000))  # admins must be allowed too
    assert policy.allows(_peer(0)) and policy.allows(_peer(500))
    with pytest.raises(Exception, match="unknown user"):
        AccessPolicy.from_names(["no-such-user-here"], [], [], [])


def test_bind_mode_stale_socket_and_peer_credentials(tmp_path):
    # Inside trio: closing a trio socket tells its I/O manager.
    trio.run(_bind_checks, tmp_path)


async def _bind_checks(tmp_path):
    path = tmp_path / "d" / "s.sock"
    bound = bind_socket(path, 0o660, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    with pytest.raises(ListenerError, match="in use"):
        bind_socket(path, 0o660, None)  # a live socket is never replaced
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    server_side, _ = bound.sock._sock.accept()
    creds = peer_credentials(server_side)
    assert (creds.uid, creds.pid) == (os.getuid(), os.getpid())
    assert os.getgid() in creds.groups
    server_side.close()
    client.close()
    bound.sock.close()  # dies without unlinking: a stale file remains
    assert path.exists()
    again = bind_socket(path, 0o600, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    release(again)
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(ListenerError, match="not a socket"):
        bind_socket(path, 0o660, None)


def test_inherited_sockets_only_for_this_pid():
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert inherited_sockets(env) == [] and "LISTEN_FDS" in env


def test_rate_limiter_token_bucket():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take(7) for _ in range(3)] == [None, None, None]
    assert limiter.take(7) == pytest.approx(0.5)
    assert limiter.take(8) is None  # buckets are per uid
    now[0] = 0.5
    assert limiter.take(7) is None and limiter.take(7) is not None
    assert RateLimiter(rate=0, burst=1).take(7) is None


def test_outbox_bounds_bytes_and_frames():
    async def main() -> None:
        box = Outbox(max_bytes=10, max_frames=3)
        await box.put(b"12345678")
        assert box.pending_bytes == 8
        assert not box.put_nowait(b"abc")  # 11 bytes: a notification is dropped
        order: list[bytes] = []

        async def put(frame: bytes) -> None:
            await box.put(frame)
            order.append(frame)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(put, b"x" * 40)  # over the budget: waits for an empty box
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(put, b"y")  # fits, but queues behind the waiting frame
            await trio.testing.wait_all_tasks_blocked()
            assert order == [] and not box.put_nowait(b"z")
            first = await box.get()
            assert first == b"12345678" and box.pending_bytes == 8  # counted until sent
            box.sent(first)
            await trio.testing.wait_all_tasks_blocked()
            assert order == [b"x" * 40]  # admitted alone, then the small one waits for it
            big = await box.get()
            box.sent(big)
        assert order == [b"x" * 40, b"y"]
        assert await box.get() == b"y"
        box.sent(b"y")
        assert box.pending_bytes == 0
        for frame in (b"a", b"b", b"c"):
            assert box.put_nowait(frame)
        assert not box.put_nowait(b"d")  # max_frames

    trio.run(main)


def test_outbox_close_drains_then_fails_waiters():
    async def main() -> None:
        box = Outbox(max_bytes=4, max_frames=8)
        await box.put(b"1234")
        failed: list[str] = []

        async def put() -> None:
            try:
                await box.put(b"5")
            except trio.ClosedResourceError:
                failed.append("closed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(put)
            await trio.testing.wait_all_tasks_blocked()
            box.close()
        assert failed == ["closed"]
        assert await box.get() == b"1234"  # what was queued still goes out
        assert await box.get() is None
        assert not box.put_nowait(b"x")

    trio.run(main)


def test_startup_error_groups_keep_and_log_every_error(caplog):
    from chaid.errors import ChaidError
    from chaid.server.daemon import _one_error
    from chaid.store.errors import StoreError

    single = StoreError("no room")
    assert _one_error(ExceptionGroup("start", [single])) is single
    group = ExceptionGroup("start", [StoreError("the store is busy"),
                                     ExceptionGroup("inner", [ChaidError("socket in use")])])
    with caplog.at_level("ERROR", logger="chaid.server"):
        merged = _one_error(group)
    assert isinstance(merged, ChaidError)
    assert str(merged) == "the store is busy; socket in use"
    logged = [r.getMessage() for r in caplog.records]
    assert any("the store is busy" in m for m in logged)
    assert any("socket in use" in m for m in logged)
