"""The DiT training loop: it learns, its weights load strictly, and it resumes."""

import logging

import numpy as np
import pytest
import torch

from chaid.models import build_model, build_parts
from chaid_lab.shapes.prompts import describe
from chaid_lab.shapes.train_dit import (
    CHECKPOINT,
    MAX_CONTRAST_BOOST,
    DitTrainConfig,
    build_latent_dataset,
    flow_loss,
    latent_cover,
    latent_object_mask,
    learning_rate,
    object_contrast,
    train_dit,
)
from chaid_lab.shapes.world import Scene, ShapeObject, render_with_masks

CFG = DitTrainConfig(
    steps=40,
    batch_size=8,
    lr=2e-3,
    warmup_steps=5,
    dataset_size=48,
    encode_batch=16,
    log_every=10,
    checkpoint_every=20,
    ema_decay=0.9,
)


def _fixed_batch_loss(parts, seed=123):
    rng = np.random.default_rng(seed)
    cfg = DitTrainConfig(dataset_size=16, encode_batch=16)
    latents, scenes, _, _ = build_latent_dataset(parts, cfg, rng)
    gen = torch.Generator().manual_seed(seed)
    x0 = latents.float()
    t = torch.full((len(scenes),), 500.0)
    noise = torch.randn(x0.shape, generator=gen)
    text = parts.text_encoder.encode([describe(s, rng) for s in scenes])
    with torch.no_grad():
        return flow_loss(
            parts, x0, text, t, noise, torch.zeros(len(scenes), dtype=torch.bool)
        ).item()


def test_training_lowers_the_loss_and_resumes(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="chaid_lab.shapes.train_dit")
    half = DitTrainConfig(**{**CFG.__dict__, "steps": 20})
    train_dit(tmp_path, "tiny-test", half)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 20
    report = train_dit(tmp_path, "tiny-test", CFG)
    weights = report.weights
    assert report.steps == 40 and report.final_loss > 0
    assert "resumed from" in caplog.text and "at step 20" in caplog.text
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 40
    build_model("tiny-test", weights=weights)  # strict load of the shipped format
    before = _fixed_batch_loss(build_parts("tiny-test", init=True))
    after = _fixed_batch_loss(build_parts("tiny-test", weights=weights))
    assert after < 0.8 * before, (before, after)


def test_object_mask_marks_the_cells_an_object_covers_with_a_margin():
    scene = Scene("desert", (ShapeObject("square", "red", "right", size=0.3, x=0.0, y=0.5),))
    _, masks = render_with_masks(scene, 16, 64, 64)
    cells = latent_object_mask(masks, (8, 8, 8))
    assert cells.shape == (8, 8, 8) and cells.dtype == torch.bool
    # the square moves right: its marked cells' mean column grows frame by frame
    cols = [torch.nonzero(cells[t])[:, 1].float().mean().item() for t in range(8)]
    assert cols[-1] > cols[0] + 2 and all(b >= a for a, b in zip(cols, cols[1:], strict=False))
    # an object of a fifth of the frame, plus a one-cell margin: a small part of the grid
    assert 4 <= cells[0].sum() <= 25
    assert not latent_object_mask(np.zeros((16, 1, 64, 64), np.float32), (8, 8, 8)).any()


def test_object_contrast_grows_with_how_far_the_object_latent_stands_out():
    scene = Scene("desert", (ShapeObject("square", "red", "right", size=0.3, x=0.0, y=0.5),))
    _, masks = render_with_masks(scene, 16, 64, 64)
    core = latent_cover(masks, (8, 8, 8)) > 0.4
    ground = torch.randn((4, 8, 8, 8), generator=torch.Generator().manual_seed(0))
    readings = []
    for lift in (0.5, 2.0, 8.0):
        z = ground.clone()
        z[:, core] += lift  # every channel of the object's cells, in units of the ground's std
        readings.append(object_contrast(z, masks))
    assert readings[0] < readings[1] < readings[2]
    assert readings[2] == pytest.approx(8.0 * 2, rel=0.25)  # norm over 4 channels of ~8
    empty = np.zeros((16, 1, 64, 64), np.float32)
    assert object_contrast(ground, empty) is None  # no object: nothing to measure


def test_contrast_reference_boosts_low_contrast_clips_within_bounds(one_thread):
    parts = build_parts("tiny-test", init=True)
    cfg = DitTrainConfig(dataset_size=16, encode_batch=8, object_weight=4.0,
                         contrast_reference=1e3)
    data = build_latent_dataset(parts, cfg, np.random.default_rng(0))
    assert data.boost is not None and data.boost.shape == (16,)
    # a reference far above every clip's contrast boosts each clip with an object, capped
    assert data.boost.max() == MAX_CONTRAST_BOOST and data.boost.min() >= 1.0
    plain = build_latent_dataset(parts, DitTrainConfig(dataset_size=16, encode_batch=8,
                                                       object_weight=4.0),
                                 np.random.default_rng(0))
    assert plain.boost is None and torch.equal(plain.latents, data.latents)
    with pytest.raises(ValueError, match="object_weight"):
        DitTrainConfig(contrast_reference=7.0)


def test_weighted_loss_counts_object_cells_more(one_thread):
    parts = build_parts("tiny-test", init=True)
    x0 = torch.zeros(2, 4, 2, 4, 4)
    noise = torch.zeros_like(x0)
    noise[:, :, :, 0, 0] = 1.0  # the only error sits in cell (0, 0) of every frame
    text = parts.text_encoder.encode(["a", "b"])
    t = torch.full((2,), 500.0)
    drop = torch.zeros(2, dtype=torch.bool)
    parts.dit.eval()
    with torch.no_grad(), torch.random.fork_rng():
        plain = flow_loss(parts, x0, text, t, noise, drop).item()
        ones = flow_loss(parts, x0, text, t, noise, drop, torch.ones(2, 2, 4, 4)).item()
        w = torch.ones(2, 2, 4, 4)
        w[:, :, 0, 0] = 5.0
        there = flow_loss(parts, x0, text, t, noise, drop, w).item()
    assert abs(ones - plain) < 1e-6
    assert there > plain


def test_second_stage_starts_from_given_weights(tmp_path):
    first = train_dit(tmp_path / "a", "tiny-test", DitTrainConfig(**{**CFG.__dict__, "steps": 20}))
    cfg = DitTrainConfig(
        **{**CFG.__dict__, "steps": 1, "lr": 1e-9, "warmup_steps": 1, "ema_decay": 0.0,
           "object_weight": 4.0, "init": str(first.weights)}
    )
    second = train_dit(tmp_path / "b", "tiny-test", cfg)
    a = build_model("tiny-test", weights=first.weights).state_dict()
    b = build_model("tiny-test", weights=second.weights).state_dict()
    # one step at a negligible learning rate: the second stage's weights are the first's
    assert all(torch.allclose(a[k], b[k], atol=1e-2) for k in a)
    fresh = build_model("tiny-test").state_dict()
    assert not all(torch.allclose(a[k], fresh[k], atol=1e-2) for k in a)


def test_learning_rate_schedules():
    const = DitTrainConfig(steps=100, lr=1e-3, warmup_steps=10)
    assert [learning_rate(const, s) for s in (0, 9)] == pytest.approx([1e-4, 1e-3])
    assert learning_rate(const, 99) == learning_rate(const, 50) == 1e-3
    cos = DitTrainConfig(steps=110, lr=1e-3, warmup_steps=10, lr_schedule="cosine", lr_final=1e-5)
    rates = [learning_rate(cos, s) for s in range(110)]
    assert rates[9] == pytest.approx(1e-3) and rates[10] == pytest.approx(1e-3)
    assert rates[-1] == pytest.approx(1e-5)
    assert rates[59] == pytest.approx((1e-3 + 1e-5) / 2, rel=0.02)  # half way down
    assert all(a >= b for a, b in zip(rates[10:], rates[11:], strict=False))
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        learning_rate(DitTrainConfig(lr_schedule="linear", warmup_steps=0), 5)


def test_the_default_output_is_the_shipped_preset_weights():
    """`chaid-lab shapes train dit` without --out replaces what tiny-shapes loads."""
    from chaid.models import get_spec
    from chaid_lab.shapes.train_dit import SHIPPED_DIR, WEIGHTS

    assert SHIPPED_DIR / WEIGHTS == get_spec("tiny-shapes").dit_weights


@pytest.mark.parametrize("option, value", [("dataset_size", 0), ("dataset_size", 2.5),
                                           ("two_object_prob", 1.5), ("batch_size", -1),
                                           ("contrast_reference", -1.0),
                                           ("contrast_reference", 7.0)])
def test_cli_train_rejects_bad_options_before_training(tmp_path, option, value):
    from chaid.errors import ChaidError
    from chaid_lab.shapes.train_dit import cli_train

    with pytest.raises(ChaidError, match=f"--{option.replace('_', '-')}"):
        cli_train(tmp_path / "out", 0, 1, **{option: value})
    assert not (tmp_path / "out").exists()
