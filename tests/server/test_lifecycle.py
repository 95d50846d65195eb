"""Start, stop and restart real daemons: sd_notify, SIGTERM, socket activation, SIGKILL."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from daemonkit import BASE_ENV, LONG, REPO, Daemon, Reader, raw_connect, send

from chai_client import Client

pytestmark = pytest.mark.integration

RED = "a red circle moving left over a grassy field"
BLUE = "a blue square bouncing over a grassy field"
# Misses committed before the SIGKILL; none shares an entity with another or with RED.
KILLED_AFTER = ("a purple hexagon in a dark cave", "an orange triangle under a stormy sky")


class NotifyListener:
    """A stand-in for systemd's notification socket, read continuously like systemd does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
            except OSError:
                return

    def lines(self) -> list[str]:
        time.sleep(0.15)  # what was sent has been read
        return [line for m in list(self.messages) for line in m.splitlines()]


def _generate_in_thread(daemon: Daemon, out: dict, **params) -> tuple[threading.Thread, socket.socket]:
    """Start a generation on a raw socket; the thread stores the response frame."""
    s = raw_connect(daemon.socket, timeout=120)
    reader = Reader(s)
    send(s, "generate", {"progress": True, **params}, msgid=5)
    first = reader.next()
    assert first[0] == 2, first  # a progress notification: the job runs

    def wait() -> None:
        while True:
            frame = reader.next()
            if frame is None or frame[0] == 1:
                out["frame"] = frame
                return

    t = threading.Thread(target=wait)
    t.start()
    return t, s


def test_sigterm_drains_then_restart_keeps_the_cache(tmp_path):
    notify = NotifyListener(tmp_path / "notify.sock")
    work = tmp_path / "a"
    daemon = Daemon(work, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"},
                    config="[server]\ngrace_period_s = 60\n",
                    args=["--log-format", "json"]).start()
    try:
        time.sleep(0.3)
        lines = notify.lines()
        assert "READY=1" in lines and "WATCHDOG=1" in lines, lines
        # loading asked for more start time (a large store can outlast TimeoutStartSec)
        assert any(x.startswith("EXTEND_TIMEOUT_USEC=") for x in lines), lines
        persistent = Client(daemon.socket)  # kept open across the restart below
        miss = persistent.generate(RED)
        assert miss.cache == "miss"
        # SIGTERM during a generation: it completes, then the daemon exits 0.
        out: dict = {}
        t, s = _generate_in_thread(daemon, out, prompt="finish me", cache="off", steps=30,
                                   **LONG)
        daemon.signal(signal.SIGTERM)
        t.join(60)
        s.close()
        frame = out["frame"]
        assert frame[2] is None and frame[3]["steps"] == 30, frame
        assert daemon.proc.wait(60) == 0, daemon.log()
    finally:
        daemon.kill()
    events = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    ready = next(e for e in events if e["msg"] == "ready")
    assert ready["level"] == "info" and ready["entries"] == 0 and "fingerprint" in ready
    assert any(e["msg"] == "generated" and e["cache"] == "miss" for e in events)
    lines = notify.lines()
    assert "STOPPING=1" in lines and any(x.startswith("STATUS=") for x in lines), lines
    assert not daemon.socket.exists()  # a bound socket is removed at exit

    # The entry survives the restart: the entity-sharing prompt hits it.
    daemon = Daemon(work).start()
    try:
        hit = persistent.generate(BLUE)  # the client reconnects by itself
        persistent.close()
        assert hit.cache == "hit" and hit.steps == 8 and hit.matched.prompt == RED
        # SIGKILL after committed misses, while another miss runs (it never commits): the
        # store reopens with every committed entry.
        committed = {RED: miss.inserted["entry_id"]}
        with Client(daemon.socket) as c:
            for prompt in KILLED_AFTER:
                result = c.generate(prompt)
                assert result.cache == "miss", (prompt, result.matched)
                committed[prompt] = result.inserted["entry_id"]
        with raw_connect(daemon.socket) as s:
            send(s, "generate", {"prompt": "a black diamond sinking in a swamp",
                                 "progress": True, **LONG})
            assert Reader(s).next()[0] == 2  # running: past its lookup, before its write
            daemon.signal(signal.SIGKILL)
            daemon.proc.wait(30)
    finally:
        daemon.kill()
    check = subprocess.run([sys.executable, "-m", "chaid", "cache", "check", "--data-dir",
                            str(daemon.data_dir), "--json"], capture_output=True, text=True,
                           cwd=REPO, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert report["ok"] and report["entries"] == len(committed), report

    # A real daemon on the same data dir serves every committed entry as a hit.
    daemon = Daemon(work).start()
    try:
        with Client(daemon.socket) as c:
            listed = {e["id"]: e["prompt"] for e in c.cache_list()}
            assert listed == {entry: prompt for prompt, entry in committed.items()}
            for prompt, entry in committed.items():
                result = c.generate(prompt, format="frames")
                assert result.cache == "hit" and result.steps == 8, (prompt, result.cache)
                assert result.matched.entry_id == entry, (prompt, result.matched)
        assert daemon.stop() == 0, daemon.log()
    finally:
        daemon.kill()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")
def test_socket_activation_and_grace_period(tmp_path):
    notify = NotifyListener(tmp_path / "notify.sock")
    sock_path = tmp_path / "activated.sock"
    env = {**BASE_ENV, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(notify.path)}
    prefix = ["systemd-socket-activate", "-l", str(sock_path)]
    for key, value in env.items():
        prefix += ["-E", f"{key}={value}"]
    daemon = Daemon(tmp_path / "b", socket_path=sock_path, command=prefix,
                    config="[server]\ngrace_period_s = 0.5\n",
                    args=[])
    # The daemon's own --socket must not be used: point it somewhere else.
    daemon.cmd[daemon.cmd.index("--socket") + 1] = str(tmp_path / "unused.sock")
    daemon.start(wait=False)
    try:
        deadline = time.monotonic() + 90
        while not sock_path.exists():  # systemd-socket-activate binds it first
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with Client(sock_path, timeout=90) as c:  # the first connection launches it
            assert c.ping()["pong"]
        assert "READY=1" in notify.lines()
        assert not (tmp_path / "unused.sock").exists()
        # Grace period over: the in-flight job is cancelled with a clear error; exit 0.
        out: dict = {}
        t, s = _generate_in_thread(daemon, out, prompt="too slow", cache="off", steps=200,
                                   **LONG)
        daemon.signal(signal.SIGTERM)
        t.join(60)
        s.close()
        error = out["frame"][2]
        assert error["code"] == "shutting_down", out
        assert daemon.proc.wait(60) == 0, daemon.log()
    finally:
        daemon.kill()
    assert "STOPPING=1" in notify.lines()
    assert sock_path.exists()  # an inherited socket belongs to the service manager
