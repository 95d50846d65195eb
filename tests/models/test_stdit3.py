"""STDiT3 behaviour against the reference description (shared/reference/opensora-1.2.md)."""

import math

import pytest
import torch
from modelkit import randomize_

from chaid.models import build_model
from chaid.models.stdit3 import (
    RotaryEmbedding,
    position_embedding_2d,
    sinusoid_cos_sin,
)

B, C_IN, T, H, W = 2, 4, 3, 6, 8  # latent; 3 x 4 tokens per frame after 2x2 patches
T_TOK, S = 3, 12


@pytest.fixture(scope="module")
def model():
    return randomize_(build_model("tiny-test"), seed=7)


def _block_inputs(model, gen):
    cfg = model.cfg
    x = torch.randn(B, T_TOK * S, cfg.hidden_size, generator=gen)
    y = torch.randn(B, cfg.model_max_length, cfg.hidden_size, generator=gen)
    mask = torch.ones(B, cfg.model_max_length, dtype=torch.bool)
    t_mlp = torch.randn(B, 6 * cfg.hidden_size, generator=gen)
    return x, y, mask, t_mlp


def _changed_tokens(block, frame, pos, model):
    """Perturb one token; return a (T, S) map of which output tokens changed."""
    gen = torch.Generator().manual_seed(1)
    x, y, mask, t_mlp = _block_inputs(model, gen)
    x2 = x.clone()
    x2[0, frame * S + pos] += torch.randn(model.cfg.hidden_size, generator=gen)
    with torch.no_grad():
        a = block(x, y, mask, t_mlp, T_TOK, S)
        b = block(x2, y, mask, t_mlp, T_TOK, S)
    assert torch.equal(a[1], b[1]), "another sample changed"
    return ((a[0] - b[0]).abs().amax(-1) > 1e-6).view(T_TOK, S)


def test_spatial_block_mixes_only_within_a_frame(model):
    changed = _changed_tokens(model.spatial_blocks[0], frame=1, pos=5, model=model)
    assert changed[1].all(), "every token of the perturbed frame should see it"
    assert not changed[0].any() and not changed[2].any()


def test_temporal_block_mixes_only_one_position_across_frames(model):
    changed = _changed_tokens(model.temporal_blocks[0], frame=1, pos=5, model=model)
    assert changed[:, 5].all(), "the perturbed position in every frame should see it"
    others = torch.ones(S, dtype=torch.bool)
    others[5] = False
    assert not changed[:, others].any()


def test_temporal_blocks_use_rope_spatial_blocks_do_not(model):
    assert all(b.attn.rope is not None for b in model.temporal_blocks)
    assert all(b.attn.rope is None for b in model.spatial_blocks)


def test_spatial_attention_ignores_frame_order_temporal_does_not(model):
    """Without RoPE spatial attention is permutation-equivariant over frames."""
    gen = torch.Generator().manual_seed(2)
    x, y, mask, t_mlp = _block_inputs(model, gen)
    perm = torch.tensor([2, 0, 1])
    xp = x.view(B, T_TOK, S, -1)[:, perm].reshape(B, T_TOK * S, -1)
    with torch.no_grad():
        for block, equivariant in (
            (model.spatial_blocks[0], True),
            (model.temporal_blocks[0], False),
        ):
            out = block(x, y, mask, t_mlp, T_TOK, S).view(B, T_TOK, S, -1)[:, perm]
            outp = block(xp, y, mask, t_mlp, T_TOK, S).view(B, T_TOK, S, -1)
            assert torch.allclose(out, outp, atol=1e-5) == equivariant


def test_rope_is_interleaved_and_relative():
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 1, 5, 8)
    out = rope(x)
    assert torch.allclose(out[..., 0, :], x[..., 0, :])  # position 0 unrotated
    # position 2, first pair (dims 0, 1), frequency 1: rotated by angle 2
    a = torch.tensor(2.0)
    x0, x1 = x[0, 0, 2, 0], x[0, 0, 2, 1]
    assert torch.allclose(out[0, 0, 2, 0], x0 * a.cos() - x1 * a.sin(), atol=1e-6)
    assert torch.allclose(out[0, 0, 2, 1], x1 * a.cos() + x0 * a.sin(), atol=1e-6)
    # dot products depend only on the offset between positions
    q = torch.randn(8).expand(1, 1, 5, 8)
    k = torch.randn(8).expand(1, 1, 5, 8)
    dots = (rope(q)[0, 0, :, None, :] * rope(k)[0, 0, None, :, :]).sum(-1)
    assert torch.allclose(dots[0, 1], dots[3, 4], atol=1e-5)
    assert torch.allclose(RotaryEmbedding(72).freqs(), 1 / 10000 ** (torch.arange(0, 72, 2) / 72))


def test_timestep_embedding_is_cos_then_sin():
    emb = sinusoid_cos_sin(torch.tensor([0.0, 3.0]), 256)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(
        emb[0, 128:], torch.zeros(128)
    )
    k = 5
    freq = math.exp(-math.log(10000) * k / 128)
    assert emb[1, k].item() == pytest.approx(math.cos(3 * freq), abs=1e-6)
    assert emb[1, 128 + k].item() == pytest.approx(math.sin(3 * freq), abs=1e-6)


def test_position_embedding_follows_the_reference_formula():
    """OpenSora 240p: 15 x 27 token grid, 1152 channels; check one token by hand."""
    h, w, dim = 15, 27, 1152
    scale = math.sqrt(240 * 426) / 512
    base = round(math.sqrt(h * w))
    emb = position_embedding_2d(dim, h, w, scale, base, torch.device("cpu"), torch.float32)[0]
    row, col = 4, 19
    token = emb[row * w + col]
    col_pos = col / scale * base / w
    row_pos = row / scale * base / h
    for j in (0, 7, 287):
        freq = 1 / 10000 ** (2 * j / 576)
        assert token[j].item() == pytest.approx(math.sin(col_pos * freq), abs=1e-5)
        assert token[288 + j].item() == pytest.approx(math.cos(col_pos * freq), abs=1e-5)
        assert token[576 + j].item() == pytest.approx(math.sin(row_pos * freq), abs=1e-5)
        assert token[864 + j].item() == pytest.approx(math.cos(row_pos * freq), abs=1e-5)
    # tokens of one column share the first half; tokens of one row share the second
    assert torch.equal(emb[col, :576], emb[5 * w + col, :576])
    assert torch.equal(emb[row * w, 576:], emb[row * w + 3, 576:])


def _model_inputs(model, gen, t=T, h=H, w=W):
    cfg = model.cfg
    z = torch.randn(B, C_IN, t, h, w, generator=gen)
    y = torch.randn(B, cfg.model_max_length, cfg.caption_channels, generator=gen)
    mask = torch.zeros(B, cfg.model_max_length, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, :9] = True
    return z, y, mask


def test_padded_caption_tokens_do_not_matter_real_ones_do(model):
    gen = torch.Generator().manual_seed(3)
    z, y, mask = _model_inputs(model, gen)
    t = torch.tensor([400.0, 700.0])
    with torch.no_grad():
        base = model(z, t, y, mask, height=48, width=64)
        y_pad = y.clone()
        y_pad[~mask] = torch.randn(int((~mask).sum()), y.shape[-1], generator=gen)
        assert torch.equal(base, model(z, t, y_pad, mask, height=48, width=64))
        y_real = y.clone()
        y_real[1, 3] += 1.0
        out = model(z, t, y_real, mask, height=48, width=64)
    assert torch.equal(out[0], base[0])  # sample 0 attends only to its own caption
    assert not torch.allclose(out[1], base[1])


def test_odd_latent_sizes_are_padded_and_cropped(model):
    gen = torch.Generator().manual_seed(4)
    z, y, mask = _model_inputs(model, gen, t=3, h=5, w=7)
    with torch.no_grad():
        out = model(z, torch.tensor([10.0, 900.0]), y, mask, height=40, width=56)
    assert out.shape == (B, model.cfg.out_channels, 3, 5, 7)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_fps_and_timestep_condition_the_output(model):
    gen = torch.Generator().manual_seed(5)
    z, y, mask = _model_inputs(model, gen)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        a = model(z, t, y, mask, fps=24, height=48, width=64)
        b = model(z, t, y, mask, fps=12, height=48, width=64)
        c = model(z, t + 100, y, mask, fps=24, height=48, width=64)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_prepare_maps_tokens_as_the_block_does(model):
    """Keys and values computed from prepare(x) of the block's own input reproduce the
    block: the property Cache Attention relies on when the cached latent is the current one."""
    from chaid.models.stdit3 import self_attention

    gen = torch.Generator().manual_seed(8)
    x, y, mask, t_mlp = _block_inputs(model, gen)
    for block in (model.spatial_blocks[1], model.temporal_blocks[1]):

        def kv_from_input(blk, h, prepare):
            q, _, _ = blk.attn.project_qkv(h)
            _, k, v = blk.attn.project_qkv(prepare(x))
            return blk.attn.project_out(self_attention(q, k, v))

        with torch.no_grad():
            plain = block(x, y, mask, t_mlp, T_TOK, S)
            routed = block(x, y, mask, t_mlp, T_TOK, S, attn_fn=kv_from_input)
        assert torch.equal(plain, routed)


def test_attention_override_seam(model):
    """An override that recomputes plain attention reproduces the model bit for bit and is
    called only for the block the plan names."""
    from chaid.models.stdit3 import self_attention

    calls = []

    def plain(block, h, prepare):
        calls.append(h.shape)
        q, k, v = block.attn.project_qkv(h)
        return block.attn.project_out(self_attention(q, k, v))

    def plan(kind, index):
        return plain if (kind, index) == ("spatial", 0) else None

    gen = torch.Generator().manual_seed(6)
    z, y, mask = _model_inputs(model, gen)
    t = torch.tensor([300.0, 600.0])
    with torch.no_grad():
        assert torch.equal(
            model(z, t, y, mask, height=48, width=64),
            model(z, t, y, mask, height=48, width=64, attn_plan=plan),
        )
    assert calls == [(B * T, S, model.cfg.hidden_size)]
