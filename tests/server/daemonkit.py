"""Start and stop real ``chaid serve`` processes; talk raw msgpack-rpc to them."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

REPO = Path(__file__).resolve().parents[2]
CHAID = [sys.executable, "-m", "chaid"]
# A daemon that has not answered by then is stuck (startup is ~5-15 s on a busy 2-core VM).
START_TIMEOUT_S = 90.0
# Small and fast model; one torch thread each for the model and the embedder (spinning
# OpenMP threads on a shared 2-core machine are 40x slower).
BASE_ENV = {
    "CHAID_SERVER_TORCH_THREADS": "1",
    "CHAID_STORE_EMBEDDER_THREADS": "1",
    "CHAID_STORE_DURABLE": "false",
    "PYTHONUNBUFFERED": "1",
}
# Frames and side of a "long" generation for tiny-test: ~50 ms per step on one core.
LONG = {"frames": 16, "height": 128, "width": 128}


class Daemon:
    """A ``chaid serve`` child process with its socket, data dir and log file."""

    def __init__(self, workdir: Path, *, socket_path: Path | None = None,
                 env: dict[str, str] | None = None, args: list[str] | None = None,
                 command: list[str] | None = None, config: str | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = socket_path or workdir / "chaid.sock"
        self.data_dir = workdir / "data"
        self.log_path = workdir / "daemon.log"
        self.env = {**os.environ, **BASE_ENV, **(env or {})}
        self.env["PYTHONPATH"] = str(REPO)
        cmd = [*CHAID, "serve", "--model", "tiny-test", "--socket", str(self.socket),
               "--data-dir", str(self.data_dir)]
        if config is not None:
            cfg = workdir / "chaid.toml"
            cfg.write_text(config)
            cmd += ["--config", str(cfg)]
        self.cmd = (command or []) + cmd + (args or [])
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Daemon:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=self.workdir)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if "ready" in self.log() and self.socket.exists():
                try:
                    with raw_connect(self.socket) as s:
                        if call(s, "ping")[3]["pong"]:
                            return
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"daemon not ready in {START_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def raw_connect(path: Path, timeout: float = 30.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


class Reader:
    """Reads msgpack frames from a raw socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False,
                                         ext_hook=lambda code, data: (code, data))

    def next(self) -> Any:
        """The next frame, or None at end of stream."""
        while True:
            for frame in self.unpacker:
                return frame
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self.unpacker.feed(data)


def send(sock: socket.socket, method: str, params: Any = None, msgid: int = 1) -> None:
    sock.sendall(msgpack.packb([0, msgid, method, {} if params is None else params]))


def call(sock: socket.socket, method: str, params: Any = None, msgid: int = 1) -> list:
    """Send a request and return its response frame, skipping notifications.

    A daemon that refuses a connection at accept writes one error frame and closes, so the
    send may fail with a broken pipe; the refusal is then still there to be read."""
    try:
        send(sock, method, params, msgid)
    except (BrokenPipeError, ConnectionResetError):
        pass
    reader = Reader(sock)
    while True:
        frame = reader.next()
        if frame is None or frame[0] == 1:
            return frame


def as_user(uid: int, socket_path, method: str | None, params: dict, times: int = 1):
    """Call a method from a child process running as ``uid``; returns the error or result
    (a list of them when ``times`` > 1: the requests are pipelined on one connection)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to uid, one request, report through the pipe
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with raw_connect(socket_path, timeout=10) as s:
                if method is None:  # send nothing: what does the daemon say unasked?
                    frame = Reader(s).next()
                    out = msgpack.packb([frame[1], frame[2]["code"], Reader(s).next()])
                elif times == 1:
                    frame = call(s, method, params)
                    out = msgpack.packb(frame[2] or {"result": frame[3]})
                else:
                    for i in range(times):
                        send(s, method, params, msgid=i)
                    reader = Reader(s)
                    frames = [reader.next() for _ in range(times)]
                    out = msgpack.packb([f[2]["code"] if f[2] else "ok" for f in frames])
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out = msgpack.packb({"code": "child", "message": repr(exc)})
        os.write(w, struct.pack("I", len(out)) + out)
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return msgpack.unpackb(data[4:])
