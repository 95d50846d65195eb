"""chaid-lab bench shared on a few prompts, against a real redis-server."""

from __future__ import annotations

import shutil

import pytest

from chaid_lab.bench.shared import format_table, run


@pytest.mark.skipif(shutil.which("redis-server") is None,
                    reason="redis-server is not installed (apt-get install redis-server)")
def test_sharing_finds_what_a_split_cache_misses():
    # Store 0 gets prompts 0, 2, 4 and store 1 gets 1, 3, 5: each odd prompt shares its
    # animal with the even one before it, which only the other store has seen.
    prompts = ["a red fox in the snow", "a red fox on a beach", "a grey wolf in a forest",
               "a grey wolf by a lake", "a brown bear in a cave", "a brown bear on a bridge"]
    report = run(prompts, (2,))
    split, shared = report["rows"]
    assert (split["mode"], shared["mode"]) == ("split", "shared")
    assert split["hit_rate"] == 0 and shared["hit_rate"] == 0.5
    assert shared["redis_read_ms"]["n"] >= 1 and shared["bytes_fetched"] > 0
    assert "| 2 | shared |" in format_table(report)
