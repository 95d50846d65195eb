"""The default embedder matches natural prompts within 0.02 of MiniLM's precision and recall
(the bound of docs/store.md), with both real models."""

from __future__ import annotations

from chaid.store.analysis import Analyzer
from chaid.store.settings import StoreSettings
from chaid_lab.bench.matching import evaluate, load_triples


def test_triples_are_well_formed():
    triples = load_triples()
    assert len(triples) == 100
    assert all(set(t) == {"cached", "hit", "miss"} for t in triples)
    assert len({t["cached"] for t in triples}) == 100


def test_the_default_embedder_matches_like_minilm():
    default = StoreSettings(embedder_threads=1)
    minilm = StoreSettings(embedder="minilm", embedder_threads=1)
    got = evaluate(Analyzer.from_settings(default), default)
    ref = evaluate(Analyzer.from_settings(minilm), minilm)
    assert got["embedder"] != ref["embedder"] and default.embedder == "minilm-static"
    assert ref["precision"] > 0.8 and ref["recall"] > 0.6  # the set is not trivial either way
    assert got["precision"] >= ref["precision"] - 0.02
    assert got["recall"] >= ref["recall"] - 0.02
