"""Crash safety with real processes: a writer killed with SIGKILL at random points during
inserts, evictions and background index rebuilds, many times over the same store.

After every kill the store must open, pass its consistency check (LMDB self-consistent,
index equal to LMDB), hold every committed entry byte-identical, and differ from the
writer's announced state by at most the one operation the kill interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from crash_writer import CRASH_SHAPE
from storekit import TOY_EMBEDDER, crash_settings, toy_analysis, toy_latents

from chaid.store.cache import LatentCache

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ROUNDS = 16


def run_writer_and_kill(data_dir: Path, seed: int, start: int, delay: float) -> list[str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}"}
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "crash_writer.py"), str(data_dir), str(seed),
             str(start)],
            stdout=subprocess.PIPE, stderr=errors, text=True, env=env,
        )
        try:
            first = proc.stdout.readline()
            if first.strip() != "ready":
                proc.wait(timeout=30)
                errors.seek(0)
                pytest.fail(f"the writer did not start: {errors.read()}")
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            # Read through the same buffered reader: readline() may hold later lines.
            out = proc.stdout.read()
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        errors.seek(0)
        assert proc.returncode == -signal.SIGKILL, errors.read()
    return out.splitlines()


def replay(lines: list[str], alive: dict[str, int]) -> tuple[dict[str, int], tuple | None]:
    """Apply the announced operations; return the state and the interrupted operation."""
    alive = dict(alive)
    by_id = {v: k for k, v in alive.items()}
    pending = None
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "begin":
            pending = (parts[1], parts[2])
        elif parts[0] == "done" and parts[1] == "insert":
            name, entry_id, evicted = parts[2], int(parts[3]), [int(x) for x in parts[4:]]
            for victim in evicted:
                alive.pop(by_id.pop(victim), None)
            alive[name] = entry_id
            by_id[entry_id] = name
            pending = None
        elif parts[0] == "done" and parts[1] == "evict":
            victim = int(parts[2])
            if victim in by_id:
                alive.pop(by_id.pop(victim))
            pending = None
    return alive, pending


def verify(cache: LatentCache, announced: dict[str, int], pending: tuple | None) -> dict:
    report = cache.check()
    assert report.ok, report.problems
    stored = {r.prompt: r.entry_id for r in cache.records()}
    for name, entry_id in stored.items():  # every entry present reads back byte-identical
        want = toy_latents(name, CRASH_SHAPE)
        got = cache.get_latents(entry_id)
        assert sorted(got) == sorted(want)
        for step, arr in want.items():
            assert got[step].tobytes() == arr.astype(np.float16).tobytes()
    extra = set(stored) - set(announced)
    missing = set(announced) - set(stored)
    if pending is None:
        assert not extra and not missing
    elif pending[0] == "insert":
        # Either the insert did not commit, or it did with its FIFO victims (the oldest).
        assert extra <= {pending[1]}
        if missing:
            assert extra == {pending[1]}
            oldest = sorted(announced.values())[: len(missing)]
            assert sorted(announced[m] for m in missing) == oldest
    else:  # an interrupted eviction either happened entirely or not at all
        assert not extra
        assert {announced[m] for m in missing} <= {int(pending[1])}
    for name, entry_id in stored.items():  # the index finds every live entry, nothing else
        hit = cache.lookup(toy_analysis(name, entities=3), "fp", CRASH_SHAPE, touch=False)
        assert hit.hit and hit.entry_id == entry_id
    assert cache.total_bytes <= cache.settings.budget_bytes
    return stored


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_during_writes_never_loses_committed_entries(tmp_path):
    data_dir = tmp_path / "store"
    rng = np.random.default_rng(20240611)
    alive: dict[str, int] = {}
    start = 0
    inserted = evictions = 0
    for round_no in range(ROUNDS):
        delay = float(rng.uniform(0.02, 0.6))
        lines = run_writer_and_kill(data_dir, seed=round_no, start=start, delay=delay)
        inserted += sum(1 for line in lines if line.startswith("done insert"))
        evictions += sum(1 for line in lines if line.startswith("done evict"))
        announced, pending = replay(lines, alive)
        with LatentCache(crash_settings(data_dir), embedder=TOY_EMBEDDER) as cache:
            alive = verify(cache, announced, pending)
        start += sum(1 for line in lines if line.startswith("begin insert"))
    assert inserted > 3 * ROUNDS, "the writer should commit several entries per round"
    assert evictions > 0
