"""The T5 text encoder path with a tiny T5 built by transformers and a SentencePiece
tokenizer trained here, saved in the layout of a Hugging Face T5 snapshot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chaid.errors import WeightsError
from chaid.models.t5 import T5TextEncoder, clean_prompt, prepare_prompt

CORPUS = [
    "a red fox runs across a snowy field",
    "a cat sleeps on the sofa by the window",
    "aesthetic score: 6.5.",
    "the quick brown fox jumps over the lazy dog",
    "waves crash on a rocky beach at sunset",
]
# d_model of the tiny T5: small, and unlike any other width in the test so a mix-up shows.
TINY_DIM = 40


def make_tiny_t5(directory: Path, d_model: int = TINY_DIM, seed: int = 0) -> Path:
    """A random-weight T5 encoder and its SentencePiece tokenizer saved as a snapshot:
    config.json, model.safetensors, spiece.model, tokenizer_config.json (no tokenizer.json,
    like DeepFloyd/t5-v1_1-xxl, so transformers converts the SentencePiece model)."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_prefix=str(directory / "spiece"),
        vocab_size=48,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    T5Tokenizer(vocab_file=str(directory / "spiece.model"), extra_ids=0).save_pretrained(directory)
    (directory / "tokenizer.json").unlink(missing_ok=True)
    (directory / "spiece.vocab").unlink(missing_ok=True)
    config = T5Config(
        vocab_size=48,
        d_model=d_model,
        d_kv=8,
        d_ff=24,
        num_layers=1,
        num_heads=2,
        feed_forward_proj="gated-gelu",
    )
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_t5(tmp_path_factory.mktemp("t5"))


def test_cleaning_and_the_aesthetic_suffix():
    assert clean_prompt("  A Red  FOX\nat <b>Dawn</b> ") == "a red fox at dawn"
    assert clean_prompt("see https://example.com/x?y=1 and www.foo.org now") == "see and now"
    assert clean_prompt("Tom &amp; Jerry @someone \u201cquoted\u201d \u2014 dash") == (
        'tom & jerry "quoted" - dash'
    )
    assert clean_prompt("a%20cat") == "a cat"
    assert prepare_prompt("A red fox") == "a red fox aesthetic score: 6.5."
    assert prepare_prompt("A red fox", None) == "a red fox"


def test_dim_is_read_without_loading(t5_dir):
    enc = T5TextEncoder(t5_dir)
    assert (enc.dim, enc.max_length, enc.loaded) == (TINY_DIM, 300, False)


def test_encode_pads_to_300_and_masks_real_tokens(t5_dir):
    from transformers import AutoTokenizer, T5EncoderModel

    enc = T5TextEncoder(t5_dir)
    prompts = ["A red fox runs", "waves crash on a rocky beach at sunset"]
    out = enc.encode(prompts)
    assert out.states.shape == (2, 300, TINY_DIM) and out.states.dtype == torch.float32
    assert out.mask.dtype == torch.bool and out.states.device.type == "cpu"
    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prepare_prompt(prompt)).input_ids
        assert ids[-1] == tokenizer.eos_token_id  # the end token is included
        assert int(out.mask[i].sum()) == len(ids)
        assert out.mask[i, : len(ids)].all() and not out.mask[i, len(ids) :].any()
    # the states are T5's own, on the prepared text
    model = T5EncoderModel.from_pretrained(t5_dir).eval()
    tokens = tokenizer(
        [prepare_prompt(p) for p in prompts],
        padding="max_length",
        max_length=300,
        return_tensors="pt",
    )
    with torch.no_grad():
        ref = model(**tokens).last_hidden_state
    assert torch.allclose(out.states, ref, atol=1e-5)
    assert not torch.allclose(out.states[0], out.states[1])


def test_bfloat16_and_free_after_encode(t5_dir):
    keep = T5TextEncoder(t5_dir).encode(["a cat"])
    enc = T5TextEncoder(t5_dir, dtype=torch.bfloat16, after_encode="free")
    out = enc.encode(["a cat"])
    assert not enc.loaded  # dropped after the call, reloaded by the next
    assert out.states.dtype == torch.float32
    assert torch.allclose(out.states, keep.states, atol=0.1)
    assert torch.equal(enc.encode(["a cat"]).states, out.states)
    offload = T5TextEncoder(t5_dir, after_encode="offload")
    assert torch.equal(offload.encode(["a cat"]).states, keep.states)
    assert offload.loaded


def test_bad_directories_are_weights_errors(tmp_path, t5_dir):
    with pytest.raises(WeightsError, match="cannot read the T5 config"):
        T5TextEncoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "d_model": 8}))
    with pytest.raises(WeightsError, match="not a T5 config"):
        T5TextEncoder(tmp_path)
    with pytest.raises(ValueError, match="after_encode"):
        T5TextEncoder(t5_dir, after_encode="sometimes")
