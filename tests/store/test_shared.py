"""The shared tier against a real redis-server: two stores publish and follow each other;
Redis down, back, flushed or holding damaged latents never fails a read, never serves bad
bytes, and loses nothing the local tiers committed; the tier keeps its own budget."""

from __future__ import annotations

import time

import numpy as np
import pytest
from storekit import TOY_EMBEDDER, toy_analysis, toy_latents, toy_settings

from chaid.store.cache import LatentCache
from chaid.store.errors import CorruptEntryError, EntryNotFoundError
from chaid.store.shared import SharedTier

SHAPE = (4, 3, 8, 8)


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.fixture
def pair(tmp_path, redis_server):
    """Two stores (two daemons' worth) sharing one Redis."""
    a = LatentCache(toy_settings(tmp_path / "a"), embedder=TOY_EMBEDDER)
    b = LatentCache(toy_settings(tmp_path / "b"), embedder=TOY_EMBEDDER)
    ta = SharedTier(redis_server.url, a).start()
    tb = SharedTier(redis_server.url, b).start()
    wait_for(lambda: ta.available and tb.available)
    yield a, ta, b, tb
    ta.stop()
    tb.stop()
    a.close()
    b.close()


def test_an_entry_published_by_one_store_is_a_hit_in_the_other(pair):
    a, ta, b, tb = pair
    latents = toy_latents("red circle")
    entry = a.insert(toy_analysis("red circle"), latents, "fp").entry_id
    ta.publish(entry)
    gid = ta.gid(entry)
    wait_for(lambda: b.entry_for(gid) is not None)
    stub = b.entry_for(gid)
    assert b.get_record(stub).extra["remote"] is True  # metadata only, so far
    hit = b.lookup(toy_analysis("red circle"), "fp", SHAPE)
    assert hit.hit and hit.entry_id == stub
    got = b.get_latents(stub)  # fetched from Redis, checked, kept
    for step, want in latents.items():
        np.testing.assert_array_equal(got[step], want.astype(np.float16))
    assert "remote" not in b.get_record(stub).extra
    assert b.raw_latents(stub)[1] == a.raw_latents(entry)[1]
    assert b.total_bytes == a.total_bytes
    assert tb.counts["fetched"] == 1 and tb.counts["imported"] == 1
    assert a.entry_for(gid) is None  # a store does not import its own entries
    assert b.check().ok and a.check().ok


def test_redis_down_then_back(pair, redis_server):
    a, ta, b, tb = pair
    first = a.insert(toy_analysis("first"), toy_latents("first"), "fp").entry_id
    ta.publish(first)
    wait_for(lambda: b.entry_for(ta.gid(first)) is not None)
    redis_server.stop()
    second = a.insert(toy_analysis("second"), toy_latents("second"), "fp").entry_id
    ta.publish(second)
    wait_for(lambda: not ta.available and not tb.available)
    assert ta.stats()["pending"] == 1 and ta.stats()["last_error"]
    # Locally everything goes on: the lookup of the shared stub is a hit, its fetch a miss.
    stub = b.entry_for(ta.gid(first))
    assert b.lookup(toy_analysis("first"), "fp", SHAPE).entry_id == stub
    with pytest.raises(EntryNotFoundError):
        b.get_latents(stub)
    assert len(a) == 2 and a.get_latents(second)
    # Redis comes back empty: a republishes both of its entries, b imports the new one and
    # keeps the stub it had.
    redis_server.start()
    wait_for(lambda: ta.available and ta.stats()["pending"] == 0)
    wait_for(lambda: b.entry_for(ta.gid(second)) is not None)
    assert b.get_latents(b.entry_for(ta.gid(second)))
    assert b.get_latents(stub)  # first was published again, so the fetch works now


def test_a_vanished_entry_is_a_miss_and_is_dropped(pair, redis_server):
    a, ta, b, tb = pair
    entry = a.insert(toy_analysis("gone"), toy_latents("gone"), "fp").entry_id
    ta.publish(entry)
    wait_for(lambda: b.entry_for(ta.gid(entry)) is not None)
    stub = b.entry_for(ta.gid(entry))
    redis_server.client().flushall()
    with pytest.raises(EntryNotFoundError):
        b.get_latents(stub)
    wait_for(lambda: stub not in b.policy.catalog)
    assert tb.counts["vanished"] == 1
    assert len(a) == 1  # the origin keeps its own entry


def test_damaged_latents_in_redis_are_never_served(pair, redis_server):
    a, ta, b, tb = pair
    entry = a.insert(toy_analysis("bad"), toy_latents("bad"), "fp").entry_id
    ta.publish(entry)
    gid = ta.gid(entry)
    wait_for(lambda: b.entry_for(gid) is not None)
    r = redis_server.client()
    key = f"chaid:l:{{{gid}}}"
    blob = bytearray(r.hget(key, "3"))
    blob[10] ^= 0x40
    r.hset(key, "3", bytes(blob))
    with pytest.raises(CorruptEntryError, match="checksum"):
        b.get_latents(b.entry_for(gid))
    r.hset(key, "3", b"short")
    with pytest.raises(CorruptEntryError):
        b.get_latents(b.entry_for(gid))
    with pytest.raises(EntryNotFoundError):  # and the local tier was never written with them
        b.raw_latents(b.entry_for(gid))


def test_the_tier_keeps_its_budget_by_least_recent_use(tmp_path, redis_server):
    """One leader evicts past the tier's budget, oldest use first (a hit is a use); the
    others drop their stubs of what it evicted and keep what they already fetched."""
    a = LatentCache(toy_settings(tmp_path / "a"), embedder=TOY_EMBEDDER)
    b = LatentCache(toy_settings(tmp_path / "b"), embedder=TOY_EMBEDDER)
    entry_size = 3 * 4 * 3 * 8 * 8 * 2 + 2 * 16 * 4 + 16 * 4  # fp16 latents and vectors
    ta = SharedTier(redis_server.url, a, budget_bytes=3 * entry_size).start()
    tb = SharedTier(redis_server.url, b, budget_bytes=3 * entry_size).start()
    r = redis_server.client()
    try:
        wait_for(lambda: ta.available and tb.available)
        gids = []
        for i in range(3):
            entry = a.insert(toy_analysis(f"p{i}"), toy_latents(f"p{i}"), "fp").entry_id
            ta.publish(entry)
            gids.append(ta.gid(entry))
            wait_for(lambda g=gids[-1]: b.entry_for(g) is not None)
        assert int(r.get("chaid:bytes")) == 3 * entry_size
        assert b.get_latents(b.entry_for(gids[0]))  # a hit on p0: now the most recent use
        for i in range(3, 5):
            entry = a.insert(toy_analysis(f"p{i}"), toy_latents(f"p{i}"), "fp").entry_id
            ta.publish(entry)
            gids.append(ta.gid(entry))
        wait_for(lambda: ta.counts["evicted"] + tb.counts["evicted"] == 2)
        assert int(r.get("chaid:bytes")) == 3 * entry_size
        left = {g for g in gids if r.exists(f"chaid:e:{{{g}}}")}
        assert left == {gids[0], gids[3], gids[4]}  # p1, p2 went: least recently used
        assert ta.leader != tb.leader  # one leader at a time
        wait_for(lambda: b.entry_for(gids[1]) is None and b.entry_for(gids[2]) is None)
        assert b.entry_for(gids[0]) is not None  # fetched here: b's own now
        assert len(a) == 5  # the origin's local tier is its own budget's business
    finally:
        ta.stop()
        tb.stop()
        a.close()
        b.close()


@pytest.mark.parametrize("redis_server", [True], indirect=True)  # appendonly, fsync always
def test_three_stores_and_redis_killed_mid_stream(tmp_path, redis_server):
    """Redis SIGKILLed while three stores publish: after its restart (AOF) every entry
    acknowledged as shared is there, the ones written during the outage are published by
    their origins, and a store that starts afterwards imports all of them."""
    stores = [LatentCache(toy_settings(tmp_path / f"s{i}"), embedder=TOY_EMBEDDER)
              for i in range(3)]
    tiers = [SharedTier(redis_server.url, s).start() for s in stores]
    late = None
    try:
        wait_for(lambda: all(t.available for t in tiers))
        gids = []
        for i in range(9):
            k = i % 3
            if i == 5:  # mid-stream
                acknowledged = sum(t.counts["published"] for t in tiers)
                redis_server.kill()
            entry = stores[k].insert(toy_analysis(f"q{i}"), toy_latents(f"q{i}"), "fp")
            tiers[k].publish(entry.entry_id)
            gids.append(tiers[k].gid(entry.entry_id))
            if i < 5:
                wait_for(lambda k=k, n=i // 3 + 1: tiers[k].counts["published"] >= n)
        assert acknowledged == 5
        redis_server.start()
        wait_for(lambda: all(t.available and t.stats()["pending"] == 0 for t in tiers))
        r = redis_server.client()
        assert all(r.exists(f"chaid:e:{{{g}}}") for g in gids)
        late = LatentCache(toy_settings(tmp_path / "late"), embedder=TOY_EMBEDDER)
        late_tier = SharedTier(redis_server.url, late).start()
        wait_for(lambda: all(late.entry_for(g) is not None for g in gids))
        for i, g in enumerate(gids):  # each one readable, byte for byte
            got = late.get_latents(late.entry_for(g))
            np.testing.assert_array_equal(got[2], toy_latents(f"q{i}")[2].astype(np.float16))
        late_tier.stop()
    finally:
        for t in tiers:
            t.stop()
        for s in stores + ([late] if late else []):
            s.close()
