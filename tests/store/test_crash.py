"""Crash safety with real processes: a writer killed with SIGKILL at random points during
inserts, evictions and background index rebuilds, many times over the same store.

After every kill the store must open, pass its consistency check (LMDB self-consistent,
index equal to LMDB), hold every committed entry byte-identical, and differ from the
writer's announced state by at most the one operation the kill interrupted.
"""

from __future__ import annotations

import numpy as np
import pytest
from crashkit import replay, run_writer_and_kill, verify
from storekit import TOY_EMBEDDER, crash_settings

from chaid.store.cache import LatentCache

ROUNDS = 16


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
