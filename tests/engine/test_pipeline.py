"""The generation pipeline: determinism, guidance, validation, timings."""

import dataclasses

import numpy as np
import pytest
import torch
from modelkit import randomize_

from chaid.config import ChaiSettings
from chaid.engine.intra_cache import IntraCacheSettings
from chaid.engine.pipeline import GenerationRequest, Pipeline
from chaid.engine.sampler import Guidance
from chaid.errors import InputError
from chaid.models import build_parts
from chaid.modes import RunKind


@pytest.fixture(scope="module")
def pipeline():
    parts = build_parts("tiny-test")
    randomize_(parts.dit, seed=11)
    return Pipeline(parts, torch.device("cpu"))


def test_same_seed_same_video_bit_for_bit(pipeline):
    req = GenerationRequest("a red circle moving left", steps=6, seed=42)
    a = pipeline.generate(req)
    b = pipeline.generate(req)
    assert np.array_equal(a.video, b.video)
    assert torch.equal(a.latent, b.latent)
    c = pipeline.generate(dataclasses.replace(req, seed=43))
    assert not torch.equal(a.latent, c.latent)


def test_prompt_changes_the_video(pipeline):
    a = pipeline.generate(GenerationRequest("a red circle", steps=4))
    b = pipeline.generate(GenerationRequest("a blue square over the ocean", steps=4))
    assert not torch.equal(a.latent, b.latent)


def test_result_shapes_defaults_and_timings(pipeline):
    res = pipeline.generate(
        GenerationRequest("a green triangle", steps=3, frames=6, height=40, width=48)
    )
    assert res.video.shape == (6, 40, 48, 3) and res.video.dtype == np.uint8
    assert tuple(res.latent.shape) == (4, 6, 5, 6)
    assert res.steps == 3 and res.fps == pipeline.parts.spec.fps
    t = res.timings
    assert min(t.encode_ms, t.denoise_ms, t.decode_ms) >= 0
    assert t.total_ms >= t.denoise_ms
    spec = pipeline.parts.spec
    res = pipeline.generate(GenerationRequest("x", steps=1))
    assert res.video.shape == (spec.frames, spec.height, spec.width, 3)


def test_left_out_guidance_scale_is_the_models(pipeline):
    spec = pipeline.parts.spec
    assert pipeline.resolve(GenerationRequest("x")).cfg_scale == spec.cfg_scale
    assert pipeline.resolve(GenerationRequest("x", cfg_scale=3)).cfg_scale == 3.0
    assert pipeline.resolve(GenerationRequest("x", cfg_scale=None)).cfg_scale is None
    other = dataclasses.replace(spec, cfg_scale=2.5)
    tuned = Pipeline(dataclasses.replace(pipeline.parts, spec=other), pipeline.device)
    req = GenerationRequest("a red circle", steps=2)
    assert tuned.resolve(req).cfg_scale == 2.5
    assert torch.equal(tuned.generate(req).latent,
                       pipeline.generate(dataclasses.replace(req, cfg_scale=2.5)).latent)


def _guidance_velocity(pipeline, scale, z, t):
    text = pipeline.parts.text_encoder.encode(["a purple square bouncing"])
    g = Guidance(pipeline.parts.dit, text, scale, fps=8, height=32, width=32)
    with torch.no_grad():
        return g.velocity(z, t)


def test_cfg_scale_one_equals_the_unguided_path(pipeline):
    z = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    unguided = _guidance_velocity(pipeline, None, z, 500.0)
    assert torch.allclose(_guidance_velocity(pipeline, 1.0, z, 500.0), unguided, atol=1e-5)
    assert not torch.allclose(_guidance_velocity(pipeline, 7.0, z, 500.0), unguided, atol=1e-3)


def test_guidance_scale_zero_is_the_null_caption_with_the_prompt_mask(pipeline):
    dit = pipeline.parts.dit
    text = pipeline.parts.text_encoder.encode(["a white circle standing still"])
    z = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v0 = Guidance(dit, text, 0.0, fps=8, height=32, width=32).velocity(z, 300.0)
        null = dit(
            z, torch.tensor([300.0]), dit.null_caption(1), text.mask, fps=8, height=32, width=32
        )
        all_tokens = dit(
            z, torch.tensor([300.0]), dit.null_caption(1), None, fps=8, height=32, width=32
        )
    assert torch.allclose(v0, null[:, :4], atol=1e-5)
    assert not torch.allclose(v0, all_tokens[:, :4], atol=1e-4)


def test_step_hook_sees_each_step_its_t_and_latent_and_can_stop_the_run(pipeline):
    req = pipeline.resolve(GenerationRequest("a yellow disc", steps=5, seed=3))
    seen = []
    result = pipeline.generate(req, on_step=lambda k, t, z: seen.append((k, t, z.clone())))
    assert [k for k, _, _ in seen] == [1, 2, 3, 4, 5]
    assert [t for _, t, _ in seen] == pipeline.start(req).timesteps
    assert torch.equal(seen[0][2], pipeline.initial_noise(req))  # z_1 is the seed's noise
    assert not torch.equal(seen[1][2], seen[0][2])
    assert result.steps_run == 5

    class Stop(Exception):
        pass

    calls = []

    def stop_at_3(k, t, z):
        calls.append(k)
        if k == 3:
            raise Stop

    with pytest.raises(Stop):
        pipeline.generate(req, on_step=stop_at_3)
    assert calls == [1, 2, 3]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": ""}, "non-empty"),
        ({"prompt": "x" * 5000}, "limit"),
        ({"frames": 0}, "frames"),
        ({"height": 30}, "multiples of 8"),
        ({"width": 1 << 20}, "width"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "integer"),
        ({"seed": -1}, "seed"),
        ({"cfg_scale": float("nan")}, "finite"),
        ({"cfg_scale": 1e9}, "cfg_scale"),
        ({"frames": True}, "integer"),
    ],
)
def test_invalid_requests_are_refused_before_any_work(pipeline, change, message):
    req = dataclasses.replace(GenerationRequest("a red ball", steps=2), **change)
    with pytest.raises(InputError, match=message):
        pipeline.generate(req, on_step=lambda *a: pytest.fail("model ran"))


CHAI_VARIANTS = {
    "paper": ChaiSettings(),
    "cond, cache+current, blend": ChaiSettings(branches="cond", kv_source="cache+current",
                                               blend=0.5),
}


@pytest.mark.parametrize("variant", list(CHAI_VARIANTS))
@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="batching on a GPU needs a CUDA device")]),
])
def test_batched_requests_get_what_each_gets_alone(device, variant, monkeypatch):
    # A miss (30 steps, capturing), a hit with Cache Attention on an earlier miss's
    # latents, a hit run plain (8 steps each) and a request of 12 steps, in one batch:
    # each row at its own timestep and with its own attention, leaving the batch when it
    # is done. In float32 (matmuls are not TF32 by default); TF32 convolutions would round
    # batched and solo rows apart, and a bfloat16 model differs by its own rounding.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    parts = build_parts("tiny-test", device=torch.device(device))
    randomize_(parts.dit, seed=5)
    pipe = Pipeline(parts, torch.device(device), CHAI_VARIANTS[variant])
    entry = pipe.full("a red circle rolling right", seed=9).captured
    full = dataclasses.replace(GenerationRequest("a red circle rolling left", seed=1, steps=30),
                               capture_steps=(2, 3, 4))
    requests = [full,
                GenerationRequest("a blue square bouncing", seed=2, steps=8,
                                  cache_latents=entry),
                GenerationRequest("a crimson ball drifting left", seed=3, steps=8),
                GenerationRequest("a green triangle over the sea", seed=4, steps=12)]
    batched = pipe.generate_batch(requests)
    alone = [pipe.generate(r) for r in requests]
    for got, ref in zip(batched, alone, strict=True):
        assert got.steps == ref.steps and got.run == ref.run
        assert (got.latent - ref.latent).abs().max().item() <= 1e-4
        assert sorted(got.captured) == sorted(ref.captured)
        for k in ref.captured:
            assert (got.captured[k] - ref.captured[k]).abs().max().item() <= 1e-4
    assert [r.run for r in batched] == [RunKind.FULL, RunKind.FAST, RunKind.PLAIN,
                                        RunKind.PLAIN]
    # the hit's attention mattered: without the cache it is another video
    plain = pipe.generate(dataclasses.replace(requests[1], cache_latents=None))
    assert (plain.latent - batched[1].latent).abs().max().item() > 1e-3
    assert sorted(batched[0].captured) == [2, 3, 4] and not batched[1].captured
    # what one forward cannot share is refused before any work
    with pytest.raises(InputError, match="must share"):
        pipe.generate_batch([requests[2], GenerationRequest("x", frames=8, steps=8)])
    with pytest.raises(InputError, match="intra cache"):
        pipe.generate_batch([requests[2], dataclasses.replace(
            requests[3], intra_cache=IntraCacheSettings(threshold=0.1))])
