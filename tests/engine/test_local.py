"""chaid.local.LocalChai: CHAI in process, with and without a cache (the README's example)."""

from __future__ import annotations

import pytest

from chaid.errors import ChaidError
from chaid.local import LocalChai

RED = "a red circle moving left over a grassy field"
BLUE = "a blue square bouncing over a grassy field"


def test_miss_then_hit_then_reopen(tmp_path):
    with LocalChai(data_dir=tmp_path / "cache", model="tiny-test", device="cpu") as chai:
        assert chai.cached
        first = chai.generate(RED)
        assert (first.cache, first.steps, first.matched) == ("miss", 30, None)
        assert first.entry_id is not None and first.video.dtype.name == "uint8"
        second = chai.generate(BLUE)
        assert (second.cache, second.steps) == ("hit", 8)
        assert second.matched["entry_id"] == first.entry_id
        assert chai.lookup("a grassy field at dawn")["entry_id"] == first.entry_id
        off = chai.generate(BLUE, cache="off", steps=3)
        assert (off.cache, off.steps, off.entry_id) == ("off", 3, None)
        with pytest.raises(ChaidError):
            chai.generate("", cache="auto")
    with LocalChai(data_dir=tmp_path / "cache", model="tiny-test", device="cpu") as chai:
        assert chai.generate(BLUE, seed=1).cache == "hit"  # the entry outlived the process


def test_without_a_cache_every_request_is_plain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with LocalChai(model="tiny-test", device="cpu") as chai:
        assert not chai.cached
        result = chai.generate(RED, steps=4, frames=4, height=32, width=48)
        assert (result.cache, result.steps) == ("off", 4)
        assert result.video.shape == (4, 32, 48, 3)
        with pytest.raises(ValueError, match="no cache"):
            chai.lookup(RED)
    assert not (tmp_path / "chaid-cache").exists()  # the default data dir was not made
