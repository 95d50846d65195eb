"""Temporal guidance (sampler.temporal_guidance): a third branch with the temporal attention
made the identity, in the same model call as classifier-free guidance."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from modelkit import randomize_

from chaid.config import ConfigError, SamplerSettings, Settings
from chaid.engine.pipeline import GenerationRequest, Pipeline
from chaid.engine.sampler import Guidance
from chaid.errors import InputError
from chaid.models import build_parts


@pytest.fixture(scope="module")
def parts():
    parts = build_parts("tiny-test")
    randomize_(parts.dit, seed=17)
    return parts


def _identity_in_time(block, h, prepare):
    """Temporal attention as the identity: every frame attends to itself only."""
    _, _, v = block.attn.project_qkv(h)
    return block.attn.project_out(v)


@pytest.mark.parametrize("scale", [2.0, None])
def test_the_third_branch_is_the_model_without_temporal_attention(parts, scale):
    dit = parts.dit
    text = parts.text_encoder.encode(["a red circle moving left", "a blue square"])
    z = torch.randn(2, *parts.vae.latent_shape(4, 32, 32), generator=torch.Generator()
                    .manual_seed(3))
    t = torch.tensor([700.0, 300.0])
    with torch.no_grad():
        got = Guidance(dit, text, scale, 8, 32, 32, temporal_scale=1.5).velocity(z, t)
        plain = Guidance(dit, text, scale, 8, 32, 32).velocity(z, t)
        cond = Guidance(dit, text, None, 8, 32, 32)
        v_cond = cond.velocity(z, t)
        v_skip = cond.velocity(z, t, lambda kind, i: _identity_in_time if kind == "temporal"
                               else None)
    want = plain + 1.5 * (v_cond - v_skip)
    assert (got - want).abs().max().item() < 1e-5
    assert (v_cond - v_skip).abs().max().item() > 1e-3  # the branch does differ


def test_nothing_changes_where_there_is_no_time(parts):
    # one latent frame: attending across frames is attending to itself already
    text = parts.text_encoder.encode(["a still yellow triangle"])
    z = torch.randn(1, *parts.vae.latent_shape(1, 32, 32), generator=torch.Generator()
                    .manual_seed(5))
    with torch.no_grad():
        got = Guidance(parts.dit, text, 2.0, 8, 32, 32, temporal_scale=3.0).velocity(z, 500.0)
        want = Guidance(parts.dit, text, 2.0, 8, 32, 32).velocity(z, 500.0)
    assert (got - want).abs().max().item() < 1e-5


def test_runs_with_it_batch_like_runs_alone_and_differ_from_runs_without(parts):
    pipe = Pipeline(parts, torch.device("cpu"), temporal_guidance=1.0)
    requests = [GenerationRequest("a red circle rolling left", seed=1, steps=6),
                GenerationRequest("a green square bouncing", seed=2, steps=4)]
    batched = pipe.generate_batch(requests)
    alone = [pipe.generate(r) for r in requests]
    for got, ref in zip(batched, alone, strict=True):
        assert (got.latent - ref.latent).abs().max().item() <= 1e-4
    without = Pipeline(parts, torch.device("cpu")).generate(requests[0])
    assert (without.latent - alone[0].latent).abs().max().item() > 1e-3
    # a Cache Attention step leaves temporal guidance out, so such a hit steps alone
    hit = dataclasses.replace(requests[1], cache_latents=pipe.full("a red circle").captured)
    assert pipe.start(hit).batch_key is None
    with pytest.raises(InputError, match="under temporal guidance"):
        pipe.generate_batch([requests[0], hit])


def test_the_setting_is_checked():
    for bad in (-1.0, float("nan"), 1e9):
        with pytest.raises(ConfigError, match="temporal_guidance"):
            dataclasses.replace(Settings(), sampler=SamplerSettings(temporal_guidance=bad)
                                ).validate()
