"""Cache Attention in the model and the full/fast pipeline modes (DESIGN.md decisions)."""

import pytest
import torch
from modelkit import randomize_

from chaid.config import ChaiSettings
from chaid.engine.cache_attention import CacheAttention, batch_plan
from chaid.engine.pipeline import GenerationRequest, Pipeline
from chaid.engine.sampler import Guidance
from chaid.errors import InputError
from chaid.models import build_parts

PROMPT_A = "a red circle rolling to the left across a grassy field"
PROMPT_B = "over a meadow, a crimson ball drifts left"


@pytest.fixture(scope="module")
def parts():
    p = build_parts("tiny-test")
    randomize_(p.dit, seed=21)
    return p


def make(parts, **chai) -> Pipeline:
    return Pipeline(parts, torch.device("cpu"), ChaiSettings(**chai))


def _latent(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _velocity(parts, z, cached, step=2, **chai):
    settings = ChaiSettings(**chai)
    text = parts.text_encoder.encode([PROMPT_B])
    g = Guidance(parts.dit, text, 7.0, fps=8, height=32, width=32)
    plan = None
    if cached is not None:
        ca = CacheAttention(parts.dit, {k: cached for k in (2, 3, 4)}, settings, 32, 32, True)
        plan = batch_plan([ca], [step], 2, z.device)
    with torch.no_grad():
        return g.velocity(z, 600.0, plan)


def test_cache_equal_to_current_latent_is_plain_self_attention(parts):
    z = _latent((1, 4, 4, 4, 4), 0)
    plain = _velocity(parts, z, None)
    same = _velocity(parts, z, z[0])
    assert torch.allclose(same, plain, atol=1e-5)
    other = _velocity(parts, z, _latent((4, 4, 4, 4), 1))
    assert not torch.allclose(other, plain, atol=1e-3)


def test_steps_outside_cache_steps_are_untouched(parts):
    z = _latent((1, 4, 4, 4, 4), 0)
    assert torch.equal(
        _velocity(parts, z, None), _velocity(parts, z, _latent((4, 4, 4, 4), 1), step=5)
    )


def _block_io(parts, z, cached, cache_blocks):
    """Record every block's input and output during one guided velocity call."""
    records = {}
    hooks = []
    for kind in ("spatial", "temporal"):
        for i, block in enumerate(getattr(parts.dit, f"{kind}_blocks")):
            hooks.append(
                block.register_forward_hook(
                    lambda m, a, out, key=(kind, i): records.__setitem__(
                        key, (a[0].clone(), out.clone())
                    )
                )
            )
    try:
        _velocity(parts, z, cached, cache_blocks=cache_blocks)
    finally:
        for h in hooks:
            h.remove()
    return records


def test_changing_the_cache_changes_only_the_chosen_block(parts):
    z = _latent((1, 4, 4, 4, 4), 2)
    a = _block_io(parts, z, _latent((4, 4, 4, 4), 3), cache_blocks=(1,))
    b = _block_io(parts, z, _latent((4, 4, 4, 4), 4), cache_blocks=(1,))
    # blocks before spatial 1 see and produce the same tensors
    for key in (("spatial", 0), ("temporal", 0)):
        assert torch.equal(a[key][0], b[key][0]) and torch.equal(a[key][1], b[key][1])
    # spatial 1 gets the same input but its output depends on the cache
    assert torch.equal(a[("spatial", 1)][0], b[("spatial", 1)][0])
    assert not torch.allclose(a[("spatial", 1)][1], b[("spatial", 1)][1])


def test_full_mode_captures_steps_2_3_4_with_the_latent_shape(parts):
    pipe = make(parts)
    seen = {}
    res = pipe.generate(
        GenerationRequest(PROMPT_A, steps=30, capture_steps=(2, 3, 4), seed=5),
        on_step=lambda k, t, z: seen.__setitem__(k, z[0].clone()),
    )
    assert res.run == "full" and res.steps == 30
    assert sorted(res.captured) == [2, 3, 4]
    for k, z in res.captured.items():
        assert z.shape == res.latent.shape and z.dtype == torch.float32
        assert torch.equal(z, seen[k])
    assert not torch.equal(res.captured[2], res.captured[3])


def _count_dit_calls(parts):
    calls = []
    handle = parts.dit.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    return calls, handle


def test_fast_mode_runs_eight_evaluations_per_branch_with_cache_at_2_3_4(parts):
    pipe = make(parts)
    full = pipe.full(PROMPT_A, seed=1)
    calls, handle = _count_dit_calls(parts)
    used = []
    original = CacheAttention.tokens

    def spy(self, step, device):
        tokens = original(self, step, device)
        used.append((step, tokens is not None))
        return tokens

    CacheAttention.tokens = spy
    try:
        fast = pipe.fast(PROMPT_B, full.captured, seed=2)
    finally:
        CacheAttention.tokens = original
        handle.remove()
    assert fast.run == "fast" and fast.steps == 8
    assert calls == [2] * 8  # one model call per step, both guidance branches batched
    assert [s for s, active in used if active] == [2, 3, 4]


def test_fast_mode_differs_from_plain_8_and_depends_on_the_entry(parts):
    pipe = make(parts)
    full_a = pipe.full(PROMPT_A, seed=1)
    full_c = pipe.full("a blue square bouncing over the ocean", seed=9)
    plain = pipe.generate(GenerationRequest(PROMPT_B, steps=8, seed=2))
    fast_a = pipe.fast(PROMPT_B, full_a.captured, seed=2)
    fast_c = pipe.fast(PROMPT_B, full_c.captured, seed=2)
    assert not torch.allclose(fast_a.latent, plain.latent, atol=1e-4)
    assert not torch.allclose(fast_a.latent, fast_c.latent, atol=1e-4)


def test_cache_first_affects_the_latent_after_the_first_cached_step(parts):
    pipe = make(parts)
    cached = {k: _latent((4, 4, 4, 4), 10 + k) for k in (2, 3, 4)}
    other = {k: _latent((4, 4, 4, 4), 20 + k) for k in (2, 3, 4)}
    a = pipe.generate(
        GenerationRequest(PROMPT_B, steps=8, cache_latents=cached, capture_steps=(1, 2, 3))
    )
    b = pipe.generate(
        GenerationRequest(PROMPT_B, steps=8, cache_latents=other, capture_steps=(1, 2, 3))
    )
    assert torch.equal(a.captured[1], b.captured[1]) and torch.equal(a.captured[2], b.captured[2])
    assert not torch.allclose(a.captured[3], b.captured[3])


def test_disabled_cache_attention_equals_the_plain_path_bit_for_bit(parts):
    cached = {k: _latent((4, 4, 4, 4), k) for k in (2, 3, 4)}
    plain = make(parts).generate(GenerationRequest(PROMPT_B, steps=8, seed=3))
    off = make(parts, cache_steps=()).generate(
        GenerationRequest(PROMPT_B, steps=8, seed=3, cache_latents=cached)
    )
    assert torch.equal(plain.latent, off.latent)
    assert (plain.video == off.video).all()


def test_ablation_settings_change_the_result(parts):
    cached = {k: _latent((4, 4, 4, 4), k) for k in (2, 3, 4)}
    req = GenerationRequest(PROMPT_B, steps=8, seed=3, cache_latents=cached)
    base = make(parts).generate(req).latent
    for chai in ({"branches": "cond"}, {"kv_source": "cache+current"}, {"cache_blocks": (0, 1)}):
        assert not torch.allclose(make(parts, **chai).generate(req).latent, base, atol=1e-5), chai


def test_cond_only_leaves_the_null_branch_plain(parts):
    z = _latent((1, 4, 4, 4, 4), 0)
    cached = _latent((4, 4, 4, 4), 1)
    text = parts.text_encoder.encode([PROMPT_B])
    outs = {}
    for name, cache in (("plain", None), ("cond", cached)):
        ca = CacheAttention(
            parts.dit, {k: cached for k in (2, 3, 4)}, ChaiSettings(branches="cond"), 32, 32, True
        )
        plan = batch_plan([ca], [2], 2, z.device) if cache is not None else None
        g = Guidance(parts.dit, text, 0.0, fps=8, height=32, width=32)  # scale 0: null branch only
        with torch.no_grad():
            outs[name] = g.velocity(z, 600.0, plan)
    assert torch.allclose(outs["plain"], outs["cond"], atol=1e-6)


def test_bad_cache_entries_are_refused_before_any_work(parts):
    pipe = make(parts)
    good = {k: _latent((4, 4, 4, 4), k) for k in (2, 3, 4)}
    fail = lambda *a: pytest.fail("model ran")  # noqa: E731
    with pytest.raises(InputError, match="no latent for steps \\[4\\]"):
        pipe.generate(
            GenerationRequest(PROMPT_B, steps=8, cache_latents={2: good[2], 3: good[3]}), fail
        )
    wrong = {**good, 3: _latent((4, 4, 4, 2), 0)}
    with pytest.raises(InputError, match="step 3 has shape"):
        pipe.generate(GenerationRequest(PROMPT_B, steps=8, cache_latents=wrong), fail)
    with pytest.raises(InputError, match="cache_blocks"):
        make(parts, cache_blocks=(5,)).generate(
            GenerationRequest(PROMPT_B, steps=8, cache_latents=good), fail
        )
    with pytest.raises(InputError, match="capture_steps"):
        pipe.generate(GenerationRequest(PROMPT_B, steps=8, capture_steps=(9,)), fail)


def test_fp16_stored_latents_are_accepted(parts):
    pipe = make(parts)
    full = pipe.full(PROMPT_A, seed=1)
    half = {k: v.half() for k, v in full.captured.items()}
    a = pipe.fast(PROMPT_B, full.captured, seed=2).latent
    b = pipe.fast(PROMPT_B, half, seed=2).latent
    assert torch.allclose(a, b, atol=5e-2)


def test_hit_attends_follows_the_setting_and_the_model_preset():
    from chaid.models import get_spec
    from chaid.modes import hit_attends

    assert hit_attends(ChaiSettings(cache_attention="on"), False)
    assert not hit_attends(ChaiSettings(cache_attention="off"), True)
    assert hit_attends(ChaiSettings(), True) and not hit_attends(ChaiSettings(), False)
    # the measured choices: off where hits never beat plain few-step sampling
    assert get_spec("tiny-shapes").cache_attention is False
    assert get_spec("opensora-1.2").cache_attention is True


def test_a_hit_without_cache_attention_is_plain_fast_sampling(parts):
    on, off = make(parts, cache_attention="on"), make(parts, cache_attention="off")
    full = on.full(PROMPT_A, seed=1)
    plain = on.generate(GenerationRequest(PROMPT_B, steps=8, seed=2))
    hit_off = off.fast(PROMPT_B, full.captured, seed=2)
    assert hit_off.run == "plain" and hit_off.steps == 8
    assert torch.equal(hit_off.latent, plain.latent)
    hit_on = on.fast(PROMPT_B, full.captured, seed=2)
    assert hit_on.run == "fast" and not torch.allclose(hit_on.latent, plain.latent, atol=1e-4)
    assert make(parts).hit_attends  # tiny-test's preset keeps the paper's hits


def test_blend_scales_cache_attention_between_plain_and_the_paper(parts):
    z = _latent((1, 4, 4, 4, 4), 0)
    cached = _latent((4, 4, 4, 4), 1)
    plain = _velocity(parts, z, None)
    paper = _velocity(parts, z, cached)
    assert torch.allclose(_velocity(parts, z, cached, blend=0.0), plain, atol=1e-5)
    half = _velocity(parts, z, cached, blend=0.5)
    assert not torch.allclose(half, plain, atol=1e-4) and not torch.allclose(half, paper, atol=1e-4)
    assert torch.allclose(_velocity(parts, z, cached, blend=1.0), paper)
