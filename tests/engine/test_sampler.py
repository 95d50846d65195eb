"""Rectified-flow schedule and Euler integration (shared/reference/opensora-1.2.md)."""

import math
from itertools import pairwise

import pytest
import torch

from chaid.engine.sampler import (
    euler_step,
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


def integrate(velocity, noise, timesteps):
    z = noise
    for i, t in enumerate(timesteps):
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else 0.0
        z = euler_step(z, velocity(z, t), t, t_next)
    return z


def test_euler_integrates_to_zero():
    """Constant v: z_final = noise + v·(t_0 - 0)/1000 = noise + v, whatever the steps."""
    noise = torch.randn(1, 4, 2, 3, 3)
    v = torch.randn_like(noise)
    for steps in (1, 8, 30):
        out = integrate(lambda z, t: v, noise, schedule(steps, 2.0))
        assert torch.allclose(out, noise + v, atol=1e-5)


def test_euler_recovers_data_on_a_straight_path():
    """With the exact flow v = x0 - ε, Euler lands on x0 from x_1000 = ε."""
    x0, eps = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 2, 3, 3)
    out = integrate(lambda z, t: x0 - eps, eps, schedule(7, 3.0))
    assert torch.allclose(out, x0, atol=1e-5)


def test_schedule_rejects_zero_steps():
    with pytest.raises(ValueError):
        schedule(0)
