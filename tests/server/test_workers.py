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


def test_a_batching_worker_runs_concurrent_clients_in_one_batch(tmp_path):
    # server.max_batch = 3: three clients' jobs share the worker's model calls, and each
    # gets the video it gets alone (LocalChai, in this process, one request at a time).
    from chaid.local import LocalChai

    daemon = Daemon(tmp_path / "d", config="[server]\nmax_batch = 3\n").start()
    videos: dict[int, object] = {}
    errors: list[BaseException] = []

    def one(n: int) -> None:
        try:
            with Client(daemon.socket) as c:
                videos[n] = c.generate(f"a red circle number {n}", cache="off", seed=n,
                                       steps=120, format="frames").video
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    try:
        with Client(daemon.socket) as c:
            assert c.stats()["workers"][0]["max_batch"] == 3
        threads = [threading.Thread(target=one, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        widest = 0
        with Client(daemon.socket) as c:
            while any(t.is_alive() for t in threads):
                widest = max(widest, len(c.stats()["workers"][0]["batch"]))
                time.sleep(0.02)
        for t in threads:
            t.join(60)
        assert not errors and len(videos) == 3
        assert widest >= 2, "the jobs never ran in one batch"
        with Client(daemon.socket) as c:
            assert c.stats()["generations"]["off"] == 3
    finally:
        assert daemon.stop() == 0
    with LocalChai(model="tiny-test", device="cpu") as chai:
        for n, video in videos.items():
            ref = chai.generate(f"a red circle number {n}", seed=n, steps=120).video
            diff = abs(video.astype(int) - ref.astype(int))
            # a batched matmul sums in another order: a pixel may round the other way
            assert diff.max() <= 1 and diff.mean() < 0.01


def test_a_batching_worker_drains_and_then_cancels_its_batch_on_sigterm(tmp_path):
    # Two jobs share the batch when SIGTERM arrives: a short one finishes within the grace
    # period, the long one is cancelled at its end with `shutting_down`; the daemon exits 0.
    daemon = Daemon(tmp_path / "d",
                    config="[server]\nmax_batch = 2\ngrace_period_s = 4\n").start()
    outcomes: dict[str, object] = {}

    def one(name: str, steps: int) -> None:
        try:
            with Client(daemon.socket, timeout=120) as c:
                outcomes[name] = c.generate(f"a {name} job", cache="off", steps=steps,
                                            **LONG).steps
        except RpcError as exc:
            outcomes[name] = exc.code

    threads = [threading.Thread(target=one, args=("short", 10)),
               threading.Thread(target=one, args=("long", 200))]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        with Client(daemon.socket) as c:
            while len(c.stats()["workers"][0]["batch"]) < 2:
                assert not outcomes and time.monotonic() < deadline, \
                    f"the jobs never shared the batch: {outcomes}"
                time.sleep(0.02)
        daemon.signal()
        for t in threads:
            t.join(60)
        assert daemon.proc.wait(60) == 0, daemon.log()
    finally:
        daemon.kill()
    assert outcomes == {"short": 10, "long": "shutting_down"}, outcomes
