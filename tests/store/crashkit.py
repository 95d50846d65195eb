"""Helpers of the crash tests and of the stress suite: run the crash writer
(``crash_writer.py``) and SIGKILL it, replay what it announced, and account the reopened
store against it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from crash_writer import CRASH_SHAPE
from storekit import toy_analysis, toy_latents

from chaid.store.cache import LatentCache

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


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
                raise RuntimeError(f"the writer did not start: {errors.read()}")
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
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"the writer exited with {proc.returncode} before the kill: "
                               f"{errors.read()}")
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


@dataclass
class Accounting:
    """A killed writer's acknowledged work against what the reopened store holds."""

    stored: dict[str, int]
    lost: set[str]  # acknowledged and absent, beyond what the interrupted operation allows
    unexpected: set[str]  # present though never begun
    corrupt: list[str]  # entries that do not read back byte-identical, check problems
    unfound: list[str]  # live entries their own lookup does not find


def account(cache: LatentCache, announced: dict[str, int], pending: tuple | None) -> Accounting:
    """Compare the store with the writer's announcements (an interrupted insert may have
    committed with its FIFO victims, an interrupted eviction entirely or not at all)."""
    corrupt = list(cache.check().problems)
    stored = {r.prompt: r.entry_id for r in cache.records()}
    for name, entry_id in stored.items():  # every entry present reads back byte-identical
        want = toy_latents(name, CRASH_SHAPE)
        got = cache.get_latents(entry_id)
        if sorted(got) != sorted(want) or any(
                got[s].tobytes() != a.astype(np.float16).tobytes() for s, a in want.items()):
            corrupt.append(f"{name}: latents differ")
    extra = set(stored) - set(announced)
    missing = set(announced) - set(stored)
    allowed_extra: set[str] = set()
    allowed_missing: set[str] = set()
    if pending is not None and pending[0] == "insert":
        allowed_extra = {pending[1]}
        if extra == {pending[1]}:  # it committed, evicting the oldest entries (FIFO)
            oldest = sorted(announced.values())[: len(missing)]
            allowed_missing = {m for m in missing if announced[m] in oldest}
    elif pending is not None:
        allowed_missing = {m for m in missing if announced[m] == int(pending[1])}
    unfound = []
    for name, entry_id in stored.items():  # the index finds every live entry, nothing else
        hit = cache.lookup(toy_analysis(name, entities=3), "fp", CRASH_SHAPE, touch=False)
        if not (hit.hit and hit.entry_id == entry_id):
            unfound.append(name)
    if cache.total_bytes > cache.settings.budget_bytes:
        corrupt.append(f"{cache.total_bytes} bytes over the budget")
    return Accounting(stored, missing - allowed_missing, extra - allowed_extra, corrupt,
                      unfound)


def verify(cache: LatentCache, announced: dict[str, int], pending: tuple | None) -> dict:
    """Assert that the reopened store is exactly what the writer acknowledged (up to the
    interrupted operation); the live entries."""
    got = account(cache, announced, pending)
    assert not got.corrupt, got.corrupt
    assert not got.lost and not got.unexpected, (got.lost, got.unexpected)
    assert not got.unfound, got.unfound
    return got.stored
