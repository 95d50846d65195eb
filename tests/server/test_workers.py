"""Several device workers in one daemon (`server.cpu_workers`): one fair queue, one store,
jobs running side by side."""

from __future__ import annotations

import threading
import time

import pytest
from daemonkit import LONG, Daemon

from chai_client import Client, RpcError

pytestmark = pytest.mark.integration

RED = "a red circle moving left over a grassy field"
BLUE = "a blue square bouncing over a grassy field"


def test_two_cpu_workers_run_side_by_side_and_share_the_store(tmp_path):
    daemon = Daemon(tmp_path / "d", config="[server]\ncpu_workers = 2\n").start()
    try:
        with Client(daemon.socket) as c:
            stats = c.stats()
            assert [w["device"] for w in stats["workers"]] == ["cpu", "cpu"]
            miss = c.generate(RED)
            assert miss.cache == "miss"
            hit = c.generate(BLUE)  # whichever worker runs it reads the other's entry
            assert hit.cache == "hit" and hit.matched.entry_id == miss.inserted["entry_id"]

        errors: list[str] = []

        def long_job(n: int) -> None:
            try:
                with Client(daemon.socket) as c:
                    c.generate(f"long {n}", cache="off", steps=200, deadline_s=30, **LONG)
            except RpcError as exc:
                errors.append(exc.code)

        threads = [threading.Thread(target=long_job, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        both = False
        deadline = time.monotonic() + 20
        with Client(daemon.socket) as c:
            while time.monotonic() < deadline and not both:
                both = all(w["running"] for w in c.stats()["workers"])
                time.sleep(0.05)
        assert both, "the two jobs never ran at the same time"
        for t in threads:
            t.join(60)
        assert set(errors) <= {"deadline_exceeded"}
        with Client(daemon.socket) as c:
            assert c.stats()["generations"]["miss"] == 1
    finally:
        assert daemon.stop() == 0
