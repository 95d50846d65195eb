"""Fixtures shared by the product's tests (tests/) and the lab's (lab/tests/).

Helpers that tests import live in modules of their own (modelkit, storekit, daemonkit):
several directories have a conftest.py, so ``import conftest`` would depend on the order
pytest loads them in.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not present beside the repository")
    return SHARED


@pytest.fixture(scope="session")
def vbench_prompts(shared_dir: Path) -> list[str]:
    """VBench's 946 English prompts (../shared/data, Apache-2.0)."""
    return [p["prompt_en"] for p in json.loads((shared_dir / "data" / "vbench_prompts.json")
                                               .read_text())]


@pytest.fixture
def one_thread():
    """Small tensors: one thread avoids OpenMP start-up and spinning on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tmpfs():
    """Mount a tmpfs: ``with tmpfs(path, "4m", "ro"): ...`` (a small or read-only disk for
    the fault tests); skips where mounting needs privileges this run lacks."""

    @contextlib.contextmanager
    def mount(path: Path, size: str, *options: str):
        path.mkdir(parents=True, exist_ok=True)
        opts = ",".join((f"size={size}", *options))
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        try:
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)

    return mount


class RedisServer:
    """A real ``redis-server`` on a Unix socket in a temporary directory, no persistence:
    stopped and started again it comes back empty (a flush, as far as the tier knows)."""

    def __init__(self, workdir: Path, *, appendonly: bool = False) -> None:
        self.workdir = workdir
        self.socket = workdir / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.appendonly = appendonly
        self.proc = None

    def start(self) -> RedisServer:
        import subprocess
        import time

        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(self.socket),
             "--unixsocketperm", "700", "--save", "",
             *(["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly
               else ["--appendonly", "no"]),
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.socket.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final write."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.socket.unlink(missing_ok=True)

    def client(self):
        import redis

        return redis.Redis(unix_socket_path=str(self.socket))


@pytest.fixture
def redis_server(tmp_path_factory, request):
    """A fresh redis-server for one test (Debian's ``redis-server``; .ci/run installs it)."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server): the "
                    "shared tier's tests need a real one")
    server = RedisServer(tmp_path_factory.mktemp("redis"),
                         appendonly=getattr(request, "param", False)).start()
    yield server
    server.stop()
