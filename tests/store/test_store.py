"""The LMDB store: round trips, reopen, schema and embedder checks, map growth, full disk,
budget and eviction."""

from __future__ import annotations

import threading
import time

import lmdb
import numpy as np
import pytest
import torch
from storekit import TOY_DIM, TOY_EMBEDDER, toy_analysis, toy_latents, toy_settings

from chaid.store.cache import LatentCache
from chaid.store.db import LMDB_DIRNAME
from chaid.store.db import latent_key as db_latent_key
from chaid.store.errors import (
    EntryNotFoundError,
    EntryTooLargeError,
    StoreBusyError,
    StoreFullError,
    StoreMismatchError,
    StoreVersionError,
)

SHAPE = (4, 3, 8, 8)


def open_toy(settings, **kw) -> LatentCache:
    return LatentCache(settings, embedder=TOY_EMBEDDER, **kw)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_latents_round_trip_byte_identical(tmp_path, dtype):
    with open_toy(toy_settings(tmp_path, latent_dtype=dtype)) as cache:
        latents = toy_latents("p")
        res = cache.insert(toy_analysis("p"), latents, "fp")
        back = cache.get_latents(res.entry_id)
    assert sorted(back) == [2, 3, 4]
    for step, arr in latents.items():
        expected = arr.astype(dtype)
        assert back[step].dtype == np.dtype(dtype)
        assert back[step].tobytes() == expected.tobytes()


def test_int8_latents_quarter_the_bytes_within_half_a_step(tmp_path):
    with open_toy(toy_settings(tmp_path, latent_dtype="int8")) as cache:
        latents = toy_latents("p")
        res = cache.insert(toy_analysis("p"), latents, "fp")
        back = cache.get_latents(res.entry_id)
        record = cache.get_record(res.entry_id)
        with open_toy(toy_settings(tmp_path / "f32", latent_dtype="float32")) as exact:
            full = exact.insert(toy_analysis("p"), latents, "fp")
            exact_bytes = exact.get_record(full.entry_id).bytes
    assert record.dtype == "int8" and list(record.shape) == list(SHAPE)
    vectors = exact_bytes - 3 * np.prod(SHAPE) * 4
    # one byte a value plus one fp32 scale per channel and frame
    assert record.bytes - vectors == 3 * (np.prod(SHAPE) + 4 * SHAPE[0] * SHAPE[1])
    for step, arr in latents.items():
        assert back[step].dtype == np.float32 and back[step].shape == SHAPE
        scale = np.abs(arr).max(axis=(2, 3), keepdims=True) / 127
        assert (np.abs(back[step] - arr) <= scale / 2 + 1e-6).all()
        assert not np.array_equal(back[step], arr)  # it is lossy, and says so by its dtype


def test_int8_blob_of_the_wrong_length_is_refused():
    from chaid.store.codec import dequantise_int8, quantise_int8
    from chaid.store.errors import StoreError

    packed = quantise_int8(np.ones(SHAPE, np.float32)).tobytes()
    assert np.array_equal(dequantise_int8(packed, SHAPE), np.ones(SHAPE, np.float32))
    with pytest.raises(StoreError, match="bytes"):
        dequantise_int8(packed[:-1], SHAPE)
    with pytest.raises(StoreError, match="3 or more axes"):
        quantise_int8(np.ones((4, 4), np.float32))


def test_torch_tensors_are_accepted(tmp_path):
    with open_toy(toy_settings(tmp_path, latent_dtype="float32")) as cache:
        t = torch.arange(4 * 3 * 8 * 8, dtype=torch.bfloat16).reshape(SHAPE)
        res = cache.insert(toy_analysis("p"), {2: t, 3: t * 2}, "fp")
        back = cache.get_latents(res.entry_id)
    assert np.array_equal(back[3], (t * 2).float().numpy())


def test_entries_survive_reopen(tmp_path):
    settings = toy_settings(tmp_path)
    with open_toy(settings) as cache:
        ids = [cache.insert(toy_analysis(f"p{i}"), toy_latents(f"p{i}"), "fp").entry_id
               for i in range(5)]
        cache.lookup(toy_analysis("p1"), "fp", SHAPE)  # a hit, flushed at close
    with open_toy(settings) as cache:
        assert len(cache) == 5
        assert cache.get_record(ids[1]).hits == 1
        assert cache.get_record(ids[1]).prompt == "p1"
        assert cache.check().ok
        hit = cache.lookup(toy_analysis("p3"), "fp", SHAPE)
        assert hit.hit and hit.entry_id == ids[3]


def test_records_show_hits_before_they_reach_disk(tmp_path):
    """A hit's statistics reach LMDB with the next write; the listing shows them at once
    (`chai cache ls`: most recently used first, with today's hit counts)."""
    with open_toy(toy_settings(tmp_path)) as cache:
        ids = [cache.insert(toy_analysis(f"p{i}"), toy_latents(f"p{i}"), "fp").entry_id
               for i in range(3)]
        for _ in range(2):
            assert cache.lookup(toy_analysis("p0"), "fp", SHAPE).entry_id == ids[0]
        assert cache.policy.has_dirty()  # not written yet
        assert cache.db.read_meta() is not None
        with cache.db.read() as txn:
            assert cache.db.get_record(txn, ids[0]).hits == 0
        listed = sorted(cache.records(), key=lambda r: -r.last_access)
        assert [r.entry_id for r in listed] == [ids[0], ids[2], ids[1]]
        assert {r.entry_id: r.hits for r in listed} == {ids[0]: 2, ids[1]: 0, ids[2]: 0}


def test_unknown_schema_version_is_refused(tmp_path):
    settings = toy_settings(tmp_path)
    open_toy(settings).close()
    env = lmdb.open(str(settings.data_dir / LMDB_DIRNAME), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"schema_version", b"99", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(StoreVersionError, match="schema version 99"):
        open_toy(settings)


def test_another_embedder_is_refused(tmp_path):
    settings = toy_settings(tmp_path)
    open_toy(settings).close()
    with pytest.raises(StoreMismatchError):
        LatentCache(settings, embedder=("other-model", TOY_DIM))


def test_second_writer_is_refused(tmp_path):
    settings = toy_settings(tmp_path)
    with open_toy(settings):
        with pytest.raises(StoreBusyError):
            open_toy(settings)
    open_toy(settings).close()  # the lock went with the first cache


def test_map_grows_on_demand(tmp_path):
    settings = toy_settings(tmp_path, map_bytes=1 << 20)
    big = (4, 16, 32, 32)  # 256 KiB per step in fp32, 128 KiB in fp16
    with open_toy(settings) as cache:
        for i in range(40):
            cache.insert(toy_analysis(f"p{i}"), toy_latents(f"p{i}", big), "fp")
        assert cache.db.env.info()["map_size"] > settings.map_bytes
        assert len(cache) == 40 and cache.check().ok


def test_map_grows_while_other_threads_read(tmp_path):
    """LMDB forbids resizing the map under open read transactions of the process: growth
    waits for readers, and every read sees whole entries, never an error."""
    settings = toy_settings(tmp_path, map_bytes=1 << 20)
    big = (4, 16, 32, 32)
    errors: list[BaseException] = []
    stop = threading.Event()
    with open_toy(settings) as cache:
        first = cache.insert(toy_analysis("p0"), toy_latents("p0", big), "fp").entry_id

        def reader() -> None:
            while not stop.is_set():
                try:
                    with cache.db.read() as txn:
                        records = list(cache.db.iter_records(txn))
                        time.sleep(0.001)  # hold the transaction across a writer's commit
                        for record in records:
                            for step in record.steps:
                                raw = txn.get(db_latent_key(record.entry_id, step),
                                              db=cache.db.latents)
                                assert raw is not None and len(raw) > 0
                    assert cache.get_latents(first)
                except BaseException as exc:  # noqa: BLE001 - collected for the assert
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            for i in range(1, 40):
                cache.insert(toy_analysis(f"p{i}"), toy_latents(f"p{i}", big), "fp")
        finally:
            stop.set()
            for t in threads:
                t.join()
        grown = cache.db.env.info()["map_size"]
        assert grown >= 8 * settings.map_bytes, grown  # several growths happened
        assert errors == []
        assert len(cache) == 40 and cache.check().ok


def test_full_map_is_a_clear_error_and_loses_nothing(tmp_path):
    settings = toy_settings(tmp_path, map_bytes=1 << 20, max_map_bytes=4 << 20)
    big = (4, 16, 32, 32)
    written = []
    with open_toy(settings) as cache:
        with pytest.raises(StoreFullError, match="ceiling"):
            for i in range(100):
                written.append(cache.insert(toy_analysis(f"p{i}"), toy_latents(f"p{i}", big),
                                            "fp").entry_id)
        assert written, "some entries fit before the ceiling"
        assert len(cache) == len(written)
        assert cache.check().ok
    with open_toy(settings) as cache:  # reopens cleanly, every committed entry intact
        assert cache.check().ok
        for entry_id in written:
            rec = cache.get_record(entry_id)
            want = toy_latents(rec.prompt, big)
            got = cache.get_latents(entry_id)
            assert all(got[s].tobytes() == want[s].astype(np.float16).tobytes() for s in want)


def test_entry_larger_than_budget_is_refused(tmp_path):
    with open_toy(toy_settings(tmp_path, budget_bytes=1000)) as cache:
        with pytest.raises(EntryTooLargeError):
            cache.insert(toy_analysis("p"), toy_latents("p"), "fp")
        assert len(cache) == 0


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "lcbfu"])
def test_budget_holds_and_evicted_entries_never_hit(tmp_path, policy):
    entry_bytes = open_toy(toy_settings(tmp_path / "probe")).insert(
        toy_analysis("x"), toy_latents("x"), "fp").bytes
    budget = int(entry_bytes * 7.5)
    rng = np.random.default_rng(1)
    with open_toy(toy_settings(tmp_path, budget_bytes=budget, policy=policy,
                               rebuild_every=5)) as cache:
        evicted: set[int] = set()
        for i in range(60):
            res = cache.insert(toy_analysis(f"p{i}"), toy_latents(f"p{i}"), "fp")
            evicted.update(res.evicted)
            assert cache.total_bytes <= budget
            assert cache.db.read_meta()["total_bytes"] == cache.total_bytes
            for j in rng.integers(0, i + 1, size=3):  # lookups shape LRU/LFU/LCBFU ranks
                cache.lookup(toy_analysis(f"p{j}"), "fp", SHAPE)
        assert len(cache) == 7
        cache.wait_for_rebuild()
        report = cache.check()
        assert report.ok, report.problems
        for i in range(60):  # every stored prompt's own vectors: only live entries come back
            res = cache.lookup(toy_analysis(f"p{i}"), "fp", SHAPE, touch=False)
            if res.hit:
                assert res.entry_id not in evicted
        for entry_id in evicted:
            with pytest.raises(EntryNotFoundError):
                cache.get_latents(entry_id)


def test_explicit_evict_removes_everything(tmp_path):
    with open_toy(toy_settings(tmp_path)) as cache:
        a = cache.insert(toy_analysis("a"), toy_latents("a"), "fp").entry_id
        b = cache.insert(toy_analysis("b"), toy_latents("b"), "fp").entry_id
        assert cache.evict([a, 999]) == [a]
        assert cache.lookup(toy_analysis("a"), "fp", SHAPE).entry_id != a
        stats = cache.db.stat()["records"]
        assert stats == {"entries": 1, "latents": 3, "vectors": 2, "prompts": 1}
        assert cache.total_bytes == cache.get_record(b).bytes
        assert cache.check().ok
