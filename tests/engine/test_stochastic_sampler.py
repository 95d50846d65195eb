"""Stochastic sampling (sampler.eta, sampler.eta_until): each step re-mixes its clean and
noise estimates with a share of fresh noise drawn from the run's seed and the step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from modelkit import randomize_

from chaid.config import ConfigError, SamplerSettings, Settings
from chaid.engine.pipeline import GenerationRequest, Pipeline
from chaid.engine.repeats import settings_of
from chaid.engine.sampler import euler_step, step_noise, stochastic_step
from chaid.models import build_parts


@pytest.fixture(scope="module")
def parts():
    parts = build_parts("tiny-test")
    randomize_(parts.dit, seed=23)
    return parts


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_no_fresh_noise_is_the_euler_step():
    z, v, noise = _randn(1, 4, 2, 4, 4, seed=1), _randn(1, 4, 2, 4, 4, seed=2), \
        _randn(1, 4, 2, 4, 4, seed=3)
    got = stochastic_step(z, v, 800.0, 650.0, 0.0, noise)
    assert (got - euler_step(z, v, 800.0, 650.0)).abs().max().item() < 1e-5


def test_all_fresh_noise_keeps_only_the_clean_estimate():
    z, v, noise = _randn(1, 4, 2, 4, 4, seed=4), _randn(1, 4, 2, 4, 4, seed=5), \
        _randn(1, 4, 2, 4, 4, seed=6)
    x0 = z + 0.8 * v  # the clean estimate at t = 800
    got = stochastic_step(z, v, 800.0, 650.0, 1.0, noise)
    assert (got - (0.35 * x0 + 0.65 * noise)).abs().max().item() < 1e-5
    # to t = 0 the step lands on the clean estimate, whatever the noise
    assert (stochastic_step(z, v, 800.0, 0.0, 1.0, noise) - x0).abs().max().item() < 1e-5


def test_step_noise_depends_on_the_seed_and_the_step_alone():
    a = step_noise(7, 3, (1, 4, 2, 4, 4))
    assert torch.equal(a, step_noise(7, 3, (1, 4, 2, 4, 4)))
    assert not torch.equal(a, step_noise(7, 4, (1, 4, 2, 4, 4)))
    assert not torch.equal(a, step_noise(8, 3, (1, 4, 2, 4, 4)))
    step_noise(2**63 - 1, 30, (2,))  # the largest seed still makes a generator seed


def test_runs_are_reproducible_and_differ_from_the_ode(parts):
    request = GenerationRequest("a red circle bouncing over the ocean", seed=5, steps=6)
    stochastic = Pipeline(parts, torch.device("cpu"), eta=1.0)
    once, again = stochastic.generate(request), stochastic.generate(request)
    assert torch.equal(once.latent, again.latent)
    ode = Pipeline(parts, torch.device("cpu"), eta=0.0).generate(request)
    assert (ode.latent - once.latent).abs().max().item() > 1e-2
    # eta_until at or above the first timestep leaves every step an Euler step
    late = Pipeline(parts, torch.device("cpu"), eta=1.0, eta_until=1000.0).generate(request)
    assert torch.equal(late.latent, ode.latent)
    # the preset's own (tiny-test: 0) when the pipeline is given none
    assert Pipeline(parts, torch.device("cpu")).eta == parts.spec.eta


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="batching on a GPU needs a CUDA device")]),
])
def test_batched_runs_draw_what_they_draw_alone(device, monkeypatch):
    # a capturing miss, a Cache Attention hit and a shorter plain run in one batch, each
    # drawing its own step noise (on the CPU, whatever the device)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    dev = torch.device(device)
    parts = build_parts("tiny-test", device=dev)
    randomize_(parts.dit, seed=23)
    pipe = Pipeline(parts, dev, eta=0.7, eta_until=300.0)
    entry = pipe.full("a red circle rolling right", seed=9).captured
    requests = [GenerationRequest("a green square moving up", seed=1, steps=12,
                                  capture_steps=(2, 3, 4)),
                GenerationRequest("a blue square bouncing", seed=2, steps=8,
                                  cache_latents=entry),
                GenerationRequest("a blue triangle moving down", seed=3, steps=4)]
    batched = pipe.generate_batch(requests)
    for got, request in zip(batched, requests, strict=True):
        alone = pipe.generate(request)
        assert (got.latent - alone.latent).abs().max().item() <= 1e-4
        for k in alone.captured:
            assert (got.captured[k] - alone.captured[k]).abs().max().item() <= 1e-4


def test_a_continued_run_draws_what_the_whole_run_drew(parts):
    pipe = Pipeline(parts, torch.device("cpu"), eta=1.0)
    whole = pipe.generate(GenerationRequest("a yellow circle moving left", seed=9, steps=8,
                                            capture_steps=(4,)))
    tail = pipe.generate(GenerationRequest("a yellow circle moving left", seed=9, steps=8,
                                           start_step=4, start_latent=whole.captured[4]))
    assert (tail.latent - whole.latent).abs().max().item() < 1e-5


def test_the_repeat_key_sees_the_sampler(parts):
    ode = settings_of(Pipeline(parts, torch.device("cpu"), eta=0.0))
    assert ode != settings_of(Pipeline(parts, torch.device("cpu"), eta=1.0))
    assert ode != settings_of(Pipeline(parts, torch.device("cpu"), temporal_guidance=0.5))


@pytest.mark.parametrize("field,bad", [("eta", -0.1), ("eta", 1.5), ("eta", float("nan")),
                                       ("eta", "1"), ("eta_until", -1.0),
                                       ("eta_until", 1001.0)])
def test_the_settings_are_checked(field, bad):
    with pytest.raises(ConfigError, match=f"sampler.{field}"):
        dataclasses.replace(Settings(), sampler=SamplerSettings(**{field: bad})).validate()
