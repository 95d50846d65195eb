"""The Annoy index derived from LMDB: rebuilt when missing, corrupt, truncated or stale;
background rebuilds; tombstones; recall against brute force on real prompt entities."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
from storekit import TOY_EMBEDDER, toy_analysis, toy_latents, toy_settings

from chaid.store.cache import LatentCache
from chaid.store.errors import EntryNotFoundError
from chaid.store.index import MANIFEST_NAME, EntityIndex

SHAPE = (4, 3, 8, 8)


def filled(settings, n: int, start: int = 0) -> list[int]:
    with LatentCache(settings, embedder=TOY_EMBEDDER) as cache:
        ids = [cache.insert(toy_analysis(f"p{i}"), toy_latents(f"p{i}"), "fp").entry_id
               for i in range(start, start + n)]
        cache.wait_for_rebuild()
    return ids


def all_found(settings, n: int) -> None:
    with LatentCache(settings, embedder=TOY_EMBEDDER) as cache:
        report = cache.check()
        assert report.ok, report.problems
        for i in range(n):
            res = cache.lookup(toy_analysis(f"p{i}"), "fp", SHAPE, touch=False)
            assert res.hit and res.cached_prompt == f"p{i}"


def annoy_file(settings):
    manifest = json.loads((settings.data_dir / MANIFEST_NAME).read_text())
    return settings.data_dir / f"index-{manifest['generation']}.annoy"


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped", "manifest", "empty"])
def test_damaged_index_is_rebuilt_from_lmdb(tmp_path, damage, caplog):
    settings = toy_settings(tmp_path, rebuild_every=10)
    filled(settings, 30)
    path = annoy_file(settings)
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "flipped":
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "manifest":
        (settings.data_dir / MANIFEST_NAME).write_text("{not json")
    else:
        path.write_bytes(b"")
    all_found(settings, 30)
    assert "rebuilding" in caplog.text
    all_found(settings, 30)  # and the rebuilt files load cleanly next time


def test_stale_index_is_reconciled(tmp_path):
    settings = toy_settings(tmp_path, rebuild_every=1000)
    ids = filled(settings, 10)
    with LatentCache(settings, embedder=TOY_EMBEDDER) as cache:
        cache.rebuild_index()
    saved = tmp_path / "saved"
    shutil.copytree(settings.data_dir, saved, ignore=shutil.ignore_patterns("lmdb"))
    filled(settings, 10, start=10)  # newer entries ...
    with LatentCache(settings, embedder=TOY_EMBEDDER) as cache:
        cache.evict(ids[:3])  # ... and evictions the old index never saw
    for f in saved.iterdir():  # put the old index generation back
        shutil.copy(f, settings.data_dir / f.name)
    with LatentCache(settings, embedder=TOY_EMBEDDER) as cache:
        assert cache.index.delta_size == 20  # the ten new entries' two entities each
        assert cache.index.tombstones == frozenset(ids[:3])
        assert cache.check().ok
        for i in range(3, 20):
            assert cache.lookup(toy_analysis(f"p{i}"), "fp", SHAPE).cached_prompt == f"p{i}"
        for i in range(3):
            assert cache.lookup(toy_analysis(f"p{i}"), "fp", SHAPE).cached_prompt != f"p{i}"


def test_background_rebuild_swaps_generations(tmp_path):
    settings = toy_settings(tmp_path, rebuild_every=8)
    with LatentCache(settings, embedder=TOY_EMBEDDER) as cache:
        first = cache.index.generation
        for i in range(40):
            cache.insert(toy_analysis(f"p{i}"), toy_latents(f"p{i}"), "fp")
            if i == 20:
                cache.evict([3, 4])
        cache.wait_for_rebuild()
        assert cache.index.generation > first
        assert cache.index.built_size + cache.index.delta_size >= 76
        assert cache.check().ok
    names = sorted(p.name for p in settings.data_dir.glob("index-*"))
    assert len(names) == 2, names  # one generation on disk, no leftovers


@pytest.mark.slow
def test_recall_on_real_entities(analyzer, vbench_prompts, tmp_path):
    """Annoy at the configured trees/search_k finds the exact nearest entity (recall@1)."""
    entities = sorted({e for a in analyzer.analyse_many(vbench_prompts) for e in a.entities})
    vectors = analyzer.embedder.embed_uncached(entities)
    index = EntityIndex(tmp_path, vectors.shape[1], trees=16, search_k=4000)
    index.build(((i, i, 0, v) for i, v in enumerate(vectors)), next_item=len(vectors))
    rng = np.random.default_rng(0)
    queries = vectors[rng.permutation(len(vectors))[:300]]
    queries = queries + rng.normal(0, 0.03, queries.shape).astype(np.float32)  # near, not equal
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = (queries @ vectors.T).max(axis=1)
    found = [index.search(q, 1)[0].cosine >= best - 1e-5 for q, best in zip(queries, exact,
                                                                             strict=True)]
    assert np.mean(found) >= 0.99


def test_concurrent_lookups_during_inserts_and_rebuilds(tmp_path):
    settings = toy_settings(tmp_path, rebuild_every=6, budget_bytes=40 * 1700)
    errors: list[BaseException] = []
    stop = threading.Event()
    with LatentCache(settings, embedder=TOY_EMBEDDER) as cache:

        def reader(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                while not stop.is_set():
                    i = int(rng.integers(0, 120))
                    res = cache.lookup(toy_analysis(f"p{i}"), "fp", SHAPE)
                    if res.hit:
                        try:
                            got = cache.get_latents(res.entry_id)
                        except EntryNotFoundError:  # evicted since the lookup: allowed
                            continue
                        want = toy_latents(res.cached_prompt)
                        assert got[2].tobytes() == want[2].astype(np.float16).tobytes()
            except BaseException as exc:  # noqa: BLE001 -- reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        try:
            for i in range(120):
                cache.insert(toy_analysis(f"p{i}"), toy_latents(f"p{i}"), "fp")
                assert cache.total_bytes <= settings.budget_bytes
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors
        cache.wait_for_rebuild()
        assert cache.check().ok
