"""Baseline seams of the pipeline: the block runner, a run started from a stored latent
(NIRVANA-VID's seam), the First-Block-Cache."""

import dataclasses

import pytest
import torch
from modelkit import randomize_

from chaid.engine.intra_cache import FirstBlockCache, IntraCacheSettings
from chaid.engine.pipeline import GenerationRequest, Pipeline
from chaid.errors import InputError
from chaid.models import build_parts

PROMPT = "a red circle moving left over a grassy field"


@pytest.fixture(scope="module")
def pipeline():
    parts = build_parts("tiny-test")
    randomize_(parts.dit, seed=5)
    return Pipeline(parts, torch.device("cpu"))


def _dit_inputs(pipeline):
    dit = pipeline.parts.dit
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 4, 4, 4, generator=gen)
    y = torch.randn(2, 5, dit.cfg.caption_channels, generator=gen)
    return dit, z, torch.tensor([900.0, 400.0]), y


def _loop_forward(dit, z, t, y):
    """STDiT3.forward as it was before the block-runner seam (the reference)."""
    B = z.shape[0]
    T, H, W = dit.token_grid(z.shape)
    S = H * W
    x = dit.embed_tokens(z, 32, 32)
    fps_t = torch.full((B,), 8.0)
    t_emb = dit.t_embedder(t, torch.float32) + dit.fps_embedder(fps_t, torch.float32)
    t_mlp = dit.t_block(t_emb)
    yy = dit.y_embedder(y)
    mask = torch.ones(yy.shape[:2], dtype=torch.bool)
    for spatial, temporal in zip(dit.spatial_blocks, dit.temporal_blocks, strict=True):
        x = temporal(spatial(x, yy, mask, t_mlp, T, S), yy, mask, t_mlp, T, S)
    x = dit.final_layer(x, t_emb)
    return dit.unpatchify(x, (T, H, W), tuple(z.shape[-3:])).float()


@torch.no_grad()
def test_block_runner_seam_keeps_the_plain_path_bit_identical(pipeline):
    dit, z, t, y = _dit_inputs(pipeline)
    ref = _loop_forward(dit, z, t, y)
    plain = dit(z, t, y, fps=8.0, height=32, width=32)
    assert torch.equal(plain, ref)

    def loop(x, run_pair, depth):
        for i in range(depth):
            x = run_pair(i, x)
        return x

    assert torch.equal(dit(z, t, y, fps=8.0, height=32, width=32, block_runner=loop), ref)
    # a never-skipping First-Block-Cache is the plain loop too
    fbc = FirstBlockCache(IntraCacheSettings(threshold=0.0))
    for step in (1, 2):
        out = dit(z, t, y, fps=8.0, height=32, width=32, block_runner=fbc.runner(step))
        assert torch.equal(out, ref)
    assert fbc.skipped == []


def test_start_at_step_one_with_the_noise_is_the_plain_run(pipeline):
    req = pipeline.resolve(GenerationRequest(PROMPT, steps=6, seed=3))
    plain = pipeline.generate(req)
    noise = pipeline.initial_noise(req)[0].cpu()
    started = pipeline.generate(dataclasses.replace(req, start_step=1, start_latent=noise))
    assert torch.equal(plain.latent, started.latent)
    assert started.start_step == 1 and started.steps_run == 6


def test_start_at_a_captured_step_continues_the_run_exactly(pipeline):
    steps, k = 10, 5
    full = pipeline.generate(GenerationRequest(PROMPT, steps=steps, seed=7, capture_steps=(k, 8)))
    seen: list[int] = []
    cont = pipeline.generate(
        GenerationRequest(
            PROMPT,
            steps=steps,
            seed=99,
            start_step=k,
            start_latent=full.captured[k],
            capture_steps=(8,),
        ),
        on_step=lambda step, t, z: seen.append(step),
    )
    assert seen == list(range(k, steps + 1))
    assert cont.steps_run == steps - k + 1
    assert torch.equal(cont.captured[8], full.captured[8])
    assert torch.equal(cont.latent, full.latent)


def test_start_step_validation(pipeline):
    shape = pipeline.parts.vae.latent_shape(4, 32, 32)
    good = torch.zeros(shape)
    with pytest.raises(InputError, match="needs a start_latent"):
        pipeline.resolve(GenerationRequest(PROMPT, steps=8, start_step=3))
    with pytest.raises(InputError, match="start_step"):
        pipeline.resolve(GenerationRequest(PROMPT, steps=8, start_step=9, start_latent=good))
    with pytest.raises(InputError, match="shape"):
        pipeline.resolve(
            GenerationRequest(PROMPT, steps=8, start_step=3, start_latent=torch.zeros(4, 1, 1, 1))
        )
    with pytest.raises(InputError, match="capture_steps"):
        pipeline.resolve(
            GenerationRequest(PROMPT, steps=8, start_step=3, start_latent=good, capture_steps=(2,))
        )
    with pytest.raises(InputError, match="cache_latents"):
        pipeline.resolve(
            GenerationRequest(
                PROMPT, steps=8, start_step=3, start_latent=good, cache_latents={2: good}
            )
        )
    with pytest.raises(InputError, match="start_step"):
        pipeline.generate(GenerationRequest(PROMPT, steps=2, start_step=3, start_latent=good))




def test_intra_cache_skips_with_a_large_threshold_and_none_at_zero(pipeline):
    req = GenerationRequest(PROMPT, steps=8, seed=2)
    plain = pipeline.generate(req)
    off = pipeline.generate(dataclasses.replace(req, intra_cache=IntraCacheSettings(threshold=0)))
    assert off.intra_skipped == () and torch.equal(off.latent, plain.latent)
    big = pipeline.generate(dataclasses.replace(req, intra_cache=IntraCacheSettings(threshold=1e9)))
    assert big.intra_skipped == tuple(range(2, 9))
    assert not torch.equal(big.latent, plain.latent)
    capped = pipeline.generate(
        dataclasses.replace(
            req, intra_cache=IntraCacheSettings(threshold=1e9, warmup_steps=2, max_consecutive=1)
        )
    )
    assert capped.intra_skipped == (3, 5, 7)
    with pytest.raises(InputError):
        pipeline.resolve(dataclasses.replace(req, intra_cache=IntraCacheSettings(threshold=-1)))


def test_capture_under_the_intra_cache_records_the_fed_latents(pipeline):
    fed: dict[int, torch.Tensor] = {}
    res = pipeline.generate(
        GenerationRequest(
            PROMPT,
            steps=8,
            seed=4,
            capture_steps=(2, 3, 4),
            intra_cache=IntraCacheSettings(threshold=1e9),
        ),
        on_step=lambda step, t, z: fed.__setitem__(step, z[0].clone()),
    )
    assert res.intra_skipped  # the captured steps follow skipped ones
    for k in (2, 3, 4):
        assert torch.equal(res.captured[k], fed[k])
