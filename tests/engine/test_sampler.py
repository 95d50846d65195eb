"""Rectified-flow schedule and Euler integration (shared/reference/opensora-1.2.md)."""

import math
from itertools import pairwise

import pytest
import torch

from chaid.engine.sampler import (
    NUM_TIMESTEPS,
    sample,
    schedule,
    timestep_transform,
    transform_ratio,
)


def test_ratio_for_240p_51_frames():
    # 51 frames → 51 // 17 * 5 = 15 latent frames with OpenSora's VAE
    r = transform_ratio(240, 426, 15)
    assert r == pytest.approx(2.42, abs=0.005)
    assert r == pytest.approx(math.sqrt(240 * 426 / 512**2) * math.sqrt(15))


def test_plain_schedule_endpoints():
    ts = schedule(30)
    assert len(ts) == 30
    assert ts[0] == 1000.0
    assert ts[-1] == pytest.approx(1000 / 30)


def test_transformed_schedule_endpoints_and_order():
    r = transform_ratio(240, 426, 15)
    ts = schedule(30, r)
    assert ts[0] == pytest.approx(1000.0)  # the transform fixes both ends of [0, 1000]
    s = 1 / 30
    assert ts[-1] == pytest.approx(1000 * r * s / (1 + (r - 1) * s))
    assert ts[-1] == pytest.approx(77.0, abs=0.1)
    assert all(a > b for a, b in pairwise(ts))
    # r > 1 keeps every step at a higher noise level than the plain schedule
    assert all(t >= p for t, p in zip(ts, schedule(30), strict=True))


def test_transform_identity_at_ratio_one():
    assert all(timestep_transform(t, 1.0) == pytest.approx(t) for t in schedule(8))


def test_euler_integrates_to_zero():
    """Constant v: z_final = noise + v·(t_0 - 0)/1000 = noise + v, whatever the steps."""
    noise = torch.randn(1, 4, 2, 3, 3)
    v = torch.randn_like(noise)
    for steps in (1, 8, 30):
        out = sample(lambda z, t, k: v, noise, schedule(steps, 2.0))
        assert torch.allclose(out, noise + v, atol=1e-5)


def test_euler_recovers_data_on_a_straight_path():
    """With the exact flow v = x0 - ε, Euler lands on x0 from x_1000 = ε."""
    x0, eps = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 2, 3, 3)
    out = sample(lambda z, t, k: x0 - eps, eps, schedule(7, 3.0))
    assert torch.allclose(out, x0, atol=1e-5)


def test_hook_sees_each_step_its_t_and_latent_and_can_stop_the_run():
    ts = schedule(5, 1.5)
    seen = []
    sample(
        lambda z, t, k: torch.ones_like(z),
        torch.zeros(1, 1, 1, 1, 1),
        ts,
        on_step=lambda k, t, z: seen.append((k, t, z.item())),
    )
    assert [k for k, _, _ in seen] == [1, 2, 3, 4, 5]
    assert [t for _, t, _ in seen] == ts
    # z_1 is the noise; z_k has moved by (1000 - t_k)/1000 with v = 1
    assert [z for _, _, z in seen] == pytest.approx(
        [(NUM_TIMESTEPS - t) / NUM_TIMESTEPS for t in ts]
    )

    class Stop(Exception):
        pass

    def stop_at_3(k, t, z):
        if k == 3:
            raise Stop

    calls = []
    with pytest.raises(Stop):
        sample(lambda z, t, k: calls.append(k) or torch.ones_like(z), torch.zeros(1), ts, stop_at_3)
    assert calls == [1, 2]


def test_schedule_rejects_zero_steps():
    with pytest.raises(ValueError):
        schedule(0)
