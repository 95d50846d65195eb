"""Paired intervals and fidelity metrics: each says what it should on data whose answer is
known, and the step curve runs, reports and resumes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import linalg

from chaid.errors import ChaidError
from chaid_lab import fidelity
from chaid_lab.stats import paired_difference, pairs_for_half_width


def test_a_clear_shift_is_a_win_and_noise_is_a_tie():
    rng = np.random.default_rng(0)
    base = rng.normal(0.9, 0.05, 300)
    better = base + 0.01 + rng.normal(0, 0.01, 300)
    win = paired_difference(better, base)
    assert win.verdict == "win" and 0 < win.low < 0.01 < win.high
    assert paired_difference(base, better).verdict == "loss"
    noise = paired_difference(base + rng.normal(0, 0.01, 300), base)
    assert noise.verdict == "tie" and noise.low < 0 < noise.high
    # lower is better (a distance): the same shift is a loss
    assert paired_difference(better, base, higher_is_better=False).verdict == "loss"


def test_interval_covers_the_true_mean_with_the_expected_width():
    rng = np.random.default_rng(1)
    d = rng.normal(0.1, 1.0, 400)
    diff = paired_difference(d, np.zeros_like(d))
    assert diff.low < 0.1 < diff.high
    assert diff.half_width == pytest.approx(1.96 / np.sqrt(400), rel=0.15)


def test_degenerate_samples():
    same = paired_difference([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
    assert (same.low, same.high, same.verdict) == (0.5, 0.5, "win")
    one = paired_difference([1.0], [0.0])
    assert one.verdict == "tie" and one.low == -np.inf
    nan = paired_difference([1.0, np.nan, 2.0], [0.0, 0.0, 0.0])
    assert nan.n == 2
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])


def test_pairs_for_half_width():
    rng = np.random.default_rng(2)
    pilot = rng.normal(0, 0.04, 2000)
    n = pairs_for_half_width(pilot, 0.005)
    assert 220 <= n <= 270  # (1.96 * 0.04 / 0.005)^2 = 246


def _clip(rng, frames=8, side=32):
    return rng.integers(0, 256, (frames, side, side, 3), dtype=np.uint8)


def test_pixel_metrics():
    rng = np.random.default_rng(3)
    video = _clip(rng)
    assert fidelity.ssim(video, video) == pytest.approx(1.0)
    noisy = np.clip(video.astype(int) + rng.integers(-20, 21, video.shape), 0, 255).astype(
        np.uint8)
    assert 15 < fidelity.psnr(noisy, video) < 40
    assert fidelity.ssim(noisy, video) < 0.99


def test_detail_and_motion_metrics():
    rng = np.random.default_rng(4)
    truth = np.zeros((8, 32, 32, 3), np.uint8)
    for f in range(8):  # a textured square moving one pixel a frame
        truth[f, 8:20, 4 + f:16 + f] = rng.integers(100, 256, (12, 12, 3))
    blurred = ((truth.astype(float) + np.roll(truth, 1, 1) + np.roll(truth, 1, 2)
                + np.roll(truth, 1, (1, 2))) / 4).astype(np.uint8)
    assert fidelity.high_frequency_ratio(blurred, truth) < 0.7
    assert fidelity.high_frequency_ratio(truth, truth) == pytest.approx(1.0)
    teleport = truth.copy()
    teleport[4:] = np.roll(truth[4:], 12, axis=2)  # jumps 12 pixels at frame 4
    assert fidelity.jump_excess(teleport, truth) > 0.05
    assert fidelity.jump_excess(truth, truth) == 0.0
    frozen = np.repeat(truth[:1], 8, axis=0)
    assert fidelity.motion_error(frozen, truth) > 0.005
    assert fidelity.motion_error(frozen, truth) == pytest.approx(
        fidelity.motion_error(truth, frozen))
    assert fidelity.motion_error(truth, truth) == 0.0


def test_distances():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(400, 6)) * 1.3 + 0.4
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(
        ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert fidelity.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert fidelity.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    same = fidelity.kernel_distance(a, rng.normal(size=(400, 6)))
    shifted = fidelity.kernel_distance(a, b)
    assert abs(same) < 0.05 < shifted
    space = fidelity.feature_space(np.concatenate([a, a * 2]), dims=4)
    projected = space.project(np.concatenate([a, a * 2]))
    assert projected.shape == (800, 4)
    # one common scale: the mean variance per kept component is 1 over the fitted set
    assert (projected ** 2).sum(axis=1).mean() == pytest.approx(4.0 * 799 / 800, rel=1e-6)


@pytest.mark.integration
def test_step_curve_runs_reports_and_resumes(tmp_path, one_thread):
    from chaid_lab.bench.steps import StepCurveConfig, find, read_rows, run, tables

    cfg = StepCurveConfig(model="tiny-test", pairs=4, steps=(2, 4),
                          variants=("chai", "chai-t", "chai-last-kv"))
    assert run(cfg, tmp_path, (1, 2)) is None  # the other shard's pairs are missing
    assert sorted(read_rows(tmp_path)) == [1, 3]
    report = run(cfg, tmp_path, (0, 2))
    assert report["pairs"] == 4 and report["pair_kinds"] == {"all": 4, "scene": 2, "object": 2}
    c = find(report, "chai-4", "plain-4", "judge")
    assert c["low"] <= c["mean"] <= c["high"] and c["verdict"] in ("win", "loss", "tie")
    assert find(report, "plain-2", "full-30", "fd")["n"] == 4
    assert report["summary"]["all"]["plain-4"]["psnr"] > 0
    assert "| 4 |" in tables(report) and "| 4 (chai-t) |" in tables(report)
    assert find(report, "chai-t-2", "plain-2", "psnr")["n"] == 4
    # a torn last line (a run killed mid-write) is skipped, and that pair runs again
    with (tmp_path / "rows-0.jsonl").open("a") as fh:
        fh.write('{"index": 9, "trunc')
    assert sorted(read_rows(tmp_path)) == [0, 1, 2, 3]
    again = run(cfg, tmp_path, (0, 1))  # nothing left to generate: the same report
    assert json.dumps(again["summary"]) == json.dumps(report["summary"])
    assert find(report, "chai-last-kv-4", "plain-4", "judge")["n"] == 4
    # rows of another configuration are never mixed into a report
    with pytest.raises(ChaidError, match="another configuration"):
        run(dataclasses.replace(cfg, cfg_scale=7.5), tmp_path, (0, 1))
    with pytest.raises(ChaidError, match="another configuration"):
        run(dataclasses.replace(cfg, eta=1.0), tmp_path, (0, 1))
    # the configuration names the sampler the rows used (tiny-test's: the ODE); rows saved
    # before it did were sampled with the ODE
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["eta"], saved["eta_until"]) == (0.0, 0.0)
    del saved["eta"], saved["eta_until"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert run(dataclasses.replace(cfg, eta=0.0), tmp_path, (0, 1))["pairs"] == 4
    # rows of other DiT weights under the same name (a retrained preset) are another model's
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["dit_digest"] == "init"  # tiny-test runs a seeded initialisation
    (tmp_path / "config.json").write_text(json.dumps({**saved, "dit_digest": "0" * 24}))
    with pytest.raises(ChaidError, match="another configuration"):
        run(cfg, tmp_path, (0, 1))
    # the same weights read from another path are the same model
    (tmp_path / "config.json").write_text(json.dumps({**saved, "weights": "/elsewhere"}))
    assert run(cfg, tmp_path, (0, 1))["pairs"] == 4


def test_t_matched_feeds_the_nearest_noise_level():
    from chaid.engine.sampler import schedule
    from chaid_lab.bench.steps import t_matched

    assert t_matched(30, 30, 2.0, (2, 3, 4)) == {2: 2, 3: 3, 4: 4}
    feed = t_matched(8, 30, 2.0, (2, 3, 4))
    fast, full = schedule(8, 2.0), schedule(30, 2.0)
    for k, m in feed.items():
        assert abs(full[m - 1] - fast[k - 1]) <= min(abs(t - fast[k - 1]) for t in full) + 1e-9
    assert feed[2] > 2 and feed[2] < feed[3] < feed[4]


def _square_clip(xs: list[int], size: int = 10) -> np.ndarray:
    """A white square on a grey ground at column xs[f] of each frame (16 rows down)."""
    video = np.full((len(xs), 64, 64, 3), 90, np.uint8)
    for f, x in enumerate(xs):
        video[f, 16:16 + size, x:x + size] = 250
    return video


def test_blob_jump_sees_a_teleport_and_not_a_glide():
    glide = _square_clip([4 + 3 * f for f in range(16)])
    assert fidelity.largest_blob_jump(glide) == pytest.approx(3.0, abs=0.5)
    teleport = _square_clip([4 + 2 * f if f < 8 else 56 - f for f in range(16)])  # 18 → 48
    assert fidelity.largest_blob_jump(teleport) > 20
    from chaid_lab.shapes.defects import Flags, flagged

    flags = Flags(jump=0.0, blob_jump=fidelity.largest_blob_jump(teleport), p_two=0.1,
                  shape_halves=((0.9, 0.2),))
    assert flagged("jump", flags) and flagged("shape_change", flags)
    assert not flagged("extra_object", flags)
    calm = Flags(jump=0.0, blob_jump=3.0, p_two=0.6, shape_halves=((0.9, 0.5), (0.2, 0.1)))
    assert not flagged("jump", calm) and not flagged("shape_change", calm)
    assert flagged("extra_object", calm)


def test_blob_jump_ignores_a_flickering_stripe_of_texture():
    glide = _square_clip([4 + 3 * f for f in range(16)])
    # a wave crest far below the square lights up in one frame, wider than the square is big
    glide[8, 54:58, 4:60] = 250
    assert fidelity.largest_blob_jump(glide) == pytest.approx(3.0, abs=0.5)
    # an object on the crest makes the blob object-sized: that is a jump
    glide[8, 50:60, 20:30] = 250
    assert fidelity.largest_blob_jump(glide) > 20


def test_the_defects_table_carries_a_column_per_variant():
    from chaid_lab.shapes.defects import format_table

    def checks(rate):
        return {"jump": {"videos": 40, "rate": rate, "truth_rate": 0.0, "vae_rate": 0.025,
                         "flagged_by_prompt": {"a": 9, "b": 11}}}

    report = {"seeds": 10, "steps": 30, "checks": checks(0.5),
              "sampler": {"eta": 1.0, "eta_until": 600.0, "temporal_guidance": 0.0}}
    assert "temporal guidance" not in format_table(report)
    assert format_table(report).startswith("Visible defects, 10 seeds per prompt, 30 steps,"
                                           " eta 1 while t > 600")
    report["variants"] = [{"label": "the ODE", "checks": checks(0.25)},
                          {"label": "the ODE, temporal guidance 0.5", "checks": checks(0.125)}]
    header, rule, row = format_table(report).splitlines()[2:5]
    assert header.endswith("model, the ODE | model, the ODE, temporal guidance 0.5 |")
    assert rule.count("|") == 9
    assert row == "| jump | 40 | 50% | 0% | 2% | 9, 11 | 25% | 12% |"
