"""Entity extraction, embedding and lookup with the real spaCy and MiniLM models."""

from __future__ import annotations

import numpy as np
import pytest

from chaid.store.cache import LatentCache
from chaid.store.policy import POLICIES, EntryStats, PolicyEngine
from chaid.store.settings import StoreSettings

SHAPE = (4, 3, 8, 8)


def latents() -> dict[int, np.ndarray]:
    return {s: np.full(SHAPE, s, np.float32) for s in (2, 3, 4)}


@pytest.fixture
def cache(tmp_path, analyzer):
    settings = StoreSettings(data_dir=tmp_path / "store", rebuild_every=4, map_bytes=1 << 20)
    with LatentCache.open(settings, analyzer) as c:
        yield c


def test_entities_are_trimmed_noun_chunks(analyzer):
    ex = analyzer.extractor
    assert ex("A red fox jumps over the lazy dog") == ("red fox", "lazy dog")
    assert ex("It walks on a beach with his friends, in a still frame") == ("beach", "friends")
    assert ex("a cat and a cat") == ("cat",)  # deduplicated
    assert ex("The bund Shanghai, Van Gogh style") == ("bund shanghai",)  # style dropped


def test_embeddings_are_unit_and_memo_is_exact(analyzer):
    emb = analyzer.embedder
    texts = ["red fox", "sandy beach", "a red fox on a sandy beach"]
    fresh = emb.embed_uncached(texts)
    assert np.allclose(np.linalg.norm(fresh, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(emb.embed(texts), fresh)
    assert np.array_equal(emb.embed(texts), fresh)  # second time from the memo
    one = analyzer.analyse(texts[2])
    assert one.entities == ("red fox", "sandy beach")
    assert np.allclose(one.entity_vectors, fresh[:2], atol=1e-5)


def test_hit_is_explained(cache):
    cache.insert("A party on a beach", latents(), "fp")
    cache.insert("a cat sleeping on a sofa", latents(), "fp")
    res = cache.lookup("A beautiful coastal beach in spring, waves lapping on sand", "fp", SHAPE)
    assert res.hit and res.cached_prompt == "A party on a beach"
    assert [(m.query_entity, m.cached_entity) for m in res.matches] == [
        ("beautiful coastal beach", "beach")]
    assert all(m.cosine >= cache.settings.threshold for m in res.matches)
    assert res.score == pytest.approx(sum(m.cosine for m in res.matches))
    assert cache.lookup("a spaceship orbiting Jupiter", "fp", SHAPE).hit is False


def test_only_same_fingerprint_and_shape_are_eligible(cache):
    cache.insert("a red fox in the snow", latents(), "model-a")
    assert cache.lookup("a fox", "model-a", SHAPE).hit
    assert not cache.lookup("a fox", "model-b", SHAPE).hit
    assert not cache.lookup("a fox", "model-a", (4, 3, 8, 16)).hit


def test_more_matched_entities_win_and_ties_go_to_the_closer_prompt(cache, analyzer):
    one = cache.insert("a dog", latents(), "fp").entry_id
    two = cache.insert("a dog in a park", latents(), "fp").entry_id
    res = cache.lookup("a dog playing in a park", "fp", SHAPE)
    assert res.entry_id == two and len(res.matches) == 2
    # Two entries with the same entities score the same: the whole prompt decides.
    cache.evict([one, two])
    a = cache.insert("a dog running in a park at noon", latents(), "fp").entry_id
    b = cache.insert("a dog sleeping in a park", latents(), "fp").entry_id
    query = "a dog sleeping in the park"
    res = cache.lookup(query, "fp", SHAPE)
    q = analyzer.prompt_vector(query)
    closer = max((a, b), key=lambda e: float(q @ analyzer.prompt_vector(
        cache.get_record(e).prompt)))
    assert res.entry_id == closer and res.prompt_cosine is not None


def test_whole_prompt_matcher(cache):
    cache.insert("a red fox running through a snowy forest", latents(), "fp")
    assert cache.lookup("a red fox running through a snowy forest at dawn", "fp", SHAPE,
                        matching="prompt").hit
    assert not cache.lookup("a fox", "fp", SHAPE, matching="prompt").hit


def test_policies_rank_as_documented():
    stats = [
        EntryStats(1, (), created=1, last_access=9, hits=5, benefit=1.0, bytes=100),
        EntryStats(2, (), created=2, last_access=3, hits=9, benefit=9.0, bytes=100),
        EntryStats(3, (), created=3, last_access=5, hits=1, benefit=5.0, bytes=100),
    ]
    first = {name: min(stats, key=p.rank).entry_id for name, p in POLICIES.items()}
    assert first == {"lru": 2, "lfu": 3, "fifo": 1, "lcbfu": 1}
    engine = PolicyEngine("lru", budget_bytes=250)
    engine.load(stats)
    assert engine.plan(100) == [2, 3]  # 300 + 100 - 250 = 150 bytes to free
    engine.touch(2, now=10, benefit=1.0)
    assert engine.plan(50) == [3]
