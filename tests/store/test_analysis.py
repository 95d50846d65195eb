"""The lookup's fast paths give what the plain paths give: packed embedding, the parse
without the lemmatizer, bfloat16 linear layers; and the lookup reports its stage timings."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from chaid.store.analysis import PACK_MAX_TEXTS, Embedder
from chaid.store.cache import LatentCache
from chaid.store.errors import StoreError
from chaid.store.settings import StoreSettings

SHAPE = (4, 3, 8, 8)


def _texts(analyzer, prompts: list[str], count: int) -> list[str]:
    """Prompts and their entities: the texts a lookup embeds."""
    out: list[str] = []
    for prompt in prompts[:count]:
        out.extend(analyzer.extractor(prompt))
        out.append(prompt)
    return out


def test_packed_forward_equals_padded_batches(minilm_analyzer, vbench_prompts):
    emb = minilm_analyzer.embedder
    assert emb.packs  # MiniLM is BERT-style with mean pooling
    texts = _texts(minilm_analyzer, vbench_prompts, 60)
    # Lookup-sized groups (a prompt and its entities) through the packed path ...
    packed = np.concatenate([emb.embed_uncached(texts[i:i + 4])
                             for i in range(0, len(texts), 4)])
    # ... against sentence-transformers' padded batches, the reference.
    padded = emb._encode_padded(texts)
    assert np.abs(packed - padded).max() < 1e-5
    # A batch of many texts takes the padded path and agrees as well.
    assert len(texts) > PACK_MAX_TEXTS
    assert np.abs(emb.embed_uncached(texts) - padded).max() < 1e-5


def test_packed_forward_handles_long_and_single_token_texts(minilm_analyzer):
    emb = minilm_analyzer.embedder
    texts = ["fox", "a " * 300 + "fox", "red fox"]  # the second is truncated to 256 tokens
    assert np.abs(emb.embed_uncached(texts) - emb._encode_padded(texts)).max() < 1e-5


def test_entities_do_not_need_the_lemmatizer(analyzer, vbench_prompts):
    ex = analyzer.extractor
    prompts = vbench_prompts[:200]
    with_lemmas = [ex._entities(ex.nlp(p)) for p in prompts]  # every pipe runs
    assert [ex(p) for p in prompts] == with_lemmas
    assert ex.many(prompts) == with_lemmas
    # The calibration's head lemmas still come from the full pipeline.
    assert ex.heads("two red foxes") == [("red foxes", "fox")]


def test_bfloat16_embedder_stays_in_the_float32_space(minilm_analyzer, vbench_prompts):
    bf16 = Embedder(precision="bfloat16", kind="minilm")
    if bf16.precision != "bfloat16":
        pytest.skip("no native bfloat16 on this CPU")
    assert bf16.name == minilm_analyzer.embedder.name  # stores accept either precision
    texts = _texts(minilm_analyzer, vbench_prompts, 100)
    ref = minilm_analyzer.embedder.embed_uncached(texts)
    got = np.concatenate([bf16.embed_uncached(texts[i:i + 4]) for i in range(0, len(texts), 4)])
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert (got * ref).sum(axis=1).min() > 0.9995
    # Pairwise cosines (what the threshold judges) move by a few thousandths at most
    # (measured on all VBench entities: max 0.003, mean 0.0005).
    drift = np.abs(got @ got.T - ref @ ref.T).max()
    assert drift < 5e-3


def test_unknown_precision_is_refused():
    with pytest.raises(StoreError, match="embedder_precision"):
        StoreSettings(embedder_precision="float16").validate()


def test_lookup_reports_stage_timings(tmp_path, analyzer):
    settings = StoreSettings(data_dir=tmp_path / "store", map_bytes=1 << 20)
    latents = {s: np.zeros(SHAPE, np.float32) for s in (2, 3, 4)}
    with LatentCache.open(settings, analyzer) as cache:
        cache.insert("a dog running in a park", latents, "fp")
        cache.insert("a dog sleeping in a park", latents, "fp")
        res = cache.lookup("a dog in a park at night", "fp", SHAPE, touch=False)
    assert res.hit
    t = res.timings_ms
    assert {"entities", "embed", "analyse", "search", "pick", "total"} <= set(t)
    assert t["total"] >= t["analyse"] >= t["entities"]
    assert t["search"] >= t["pick"]


def test_packed_and_padded_calls_share_the_tokenizer_safely(minilm_analyzer):
    # transformers changes the fast tokenizer's padding per call: without the embedder's
    # tokenizer lock, a padded batch beside packed calls came back unpadded (ValueError)
    # or raised "Already borrowed" (huggingface/tokenizers#537).
    emb = minilm_analyzer.embedder
    errors: list[BaseException] = []

    def loop(call) -> None:
        for i in range(300):
            try:
                call(i)
            except Exception as exc:  # collected: a thread's exception would be lost
                errors.append(exc)

    threads = [
        threading.Thread(target=loop, args=(
            lambda i: emb.embed_uncached(["red fox", f"a dog number {i} in a park"]),)),
        threading.Thread(target=loop, args=(
            lambda i: emb._encode_padded(["red fox", "a much longer prompt about a dog " * 3]),)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_entity_recall_on_written_prompts(analyzer):
    """Every object and scene noun phrase of 40 written prompts is kept (docs/store.md):
    spaCy's small model reads some fragments' head nouns as adjectives ("a purple square
    standing still", "a kitten playing a keyboard") and drops them from its noun chunks;
    the extractor recovers them. Exactly right: 82 of 86 phrases; the other 4 keep their
    noun with a verb attached ("butterfly landing")."""
    import json
    from pathlib import Path

    data = json.loads((Path(__file__).parent / "data" / "entity_prompts.json").read_text())
    exact = kept = total = 0
    for prompt, want in data["prompts"]:
        got = analyzer.extractor(prompt)
        for phrase in want:
            total += 1
            exact += phrase in got
            kept += any(set(phrase.split()) <= set(entity.split()) for entity in got)
    assert kept == total, (kept, total)
    assert exact / total >= 0.95, (exact, total)
    assert analyzer.extractor("a purple square standing still on a snowy field") == (
        "purple square", "snowy field")
    assert analyzer.extractor("a kitten playing a keyboard") == ("kitten", "keyboard")


def test_a_prompt_seen_again_skips_the_parse_and_the_model(analyzer):
    """store.prompt_memo_size: the analysis of a recent prompt is reused (a repeated prompt's
    analysis went from 1.35 ms, spaCy alone, to microseconds)."""
    prompt = "a copper kettle whistling on an old iron stove"
    first = analyzer.analyse(prompt)
    timings: dict[str, float] = {}
    assert analyzer.analyse(prompt, timings=timings) is first and "memo" in timings
    assert analyzer.analyse(prompt, with_prompt_vector=False) is first
    assert first.prompt_vector is not None and first.entities == analyzer.extractor(prompt)
