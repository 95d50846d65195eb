"""Admission by cost and interruption inside long model work."""

import dataclasses
import time

import pytest
import torch
from modelkit import randomize_

from chaid import interrupt
from chaid.engine.cost import Admission, CostModel, Linear, TooCostly
from chaid.engine.pipeline import GenerationRequest, Pipeline
from chaid.models import build_parts


@pytest.fixture(scope="module")
def pipeline():
    parts = build_parts("tiny-test")
    randomize_(parts.dit, seed=3)
    return Pipeline(parts, torch.device("cpu"))


@pytest.fixture(scope="module")
def cost(pipeline):
    model = CostModel(pipeline)
    model.calibrate()
    return model


def _req(pipeline, **fields):
    return pipeline.resolve(GenerationRequest("a red circle", **fields))


def test_estimate_grows_with_size_steps_and_guidance(pipeline):
    model = CostModel(pipeline)  # not calibrated: FLOPs and memory, no seconds
    base = model.estimate(_req(pipeline, height=64, width=64), 30)
    assert base.seconds is None and base.flops > 0 and base.memory_bytes > 0
    assert model.estimate(_req(pipeline, height=64, width=64), 8).flops == pytest.approx(
        base.flops * 8 / 30)
    bigger = model.estimate(_req(pipeline, height=128, width=128), 30)
    assert bigger.tokens == 4 * base.tokens
    # Spatial attention grows with the square: more than 4x the work for 4x the tokens.
    assert bigger.flops > 4 * base.flops and bigger.memory_bytes > 3 * base.memory_bytes
    unguided = model.estimate(_req(pipeline, height=64, width=64, cfg_scale=None), 30)
    assert unguided.flops == pytest.approx(base.flops / 2)


def test_linear_fit():
    line = Linear.fit((100.0, 1.1), (1100.0, 2.1))
    assert line.rate == pytest.approx(1000.0) and line.fixed_s == pytest.approx(1.0)
    assert line.seconds(2000.0, calls=3) == pytest.approx(5.0)
    noisy = Linear.fit((100.0, 2.0), (1100.0, 1.0))  # the big call was not slower
    assert noisy.fixed_s == 0 and noisy.rate == pytest.approx(1100.0)


def test_calibrated_estimate_is_of_the_right_order(pipeline, cost):
    req = _req(pipeline, steps=6)
    t0 = time.perf_counter()
    pipeline.generate(req)
    took = time.perf_counter() - t0
    estimate = cost.estimate(req, 6).seconds
    assert took / 10 < estimate < took * 10, (estimate, took)


def test_admission_refuses_before_any_work(pipeline, cost):
    admission = Admission(cost, max_seconds=300.0, max_bytes=2 << 30)
    admission.check(_req(pipeline), 30)  # the default request fits
    huge = _req(pipeline, frames=256, height=1024, width=1024)
    with pytest.raises(TooCostly, match="max_request") as err:
        admission.check(huge, 1)
    assert err.value.data["tokens"] == cost.estimate(huge, 1).tokens
    assert err.value.data["memory_mb"] > 2048 and err.value.data["max_memory_mb"] == 2048
    slow = Admission(cost, max_seconds=1e-3, max_bytes=2 << 30)
    with pytest.raises(TooCostly, match=r"max_request_s") as err:
        slow.check(_req(pipeline), 30)
    assert err.value.data["estimated_s"] > 0
    assert admission.refused == 1 and slow.refused == 1
    assert slow.as_dict()["dit_tflops_per_s"] > 0


def test_from_settings_auto_memory_is_a_share_of_what_is_free(pipeline, cost):
    auto = Admission.from_settings(cost, 300.0, 0)
    assert 0 < auto.max_bytes < 1 << 50
    assert Admission.from_settings(cost, 300.0, 512).max_bytes == 512 << 20


class Stop(Exception):
    pass


def test_interruption_points_stop_a_forward_between_blocks(pipeline):
    """A check installed around model work runs inside each DiT forward (between blocks)
    and each decode, so it can stop a step that has begun; outside, points are no-ops."""
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    req = _req(pipeline, steps=2)
    interrupt.point()  # nothing installed: nothing happens
    with interrupt.checking(check), pytest.raises(Stop):
        pipeline.generate(req)
    assert len(calls) == 3  # stopped inside the first forward, not at a step boundary
    seen = []
    with interrupt.checking(lambda: seen.append(1)):
        pipeline.generate(dataclasses.replace(req, steps=1))
    depth = len(pipeline.parts.dit.spatial_blocks)
    assert len(seen) >= 2 * depth  # two per block pair
