"""The DiT training loop: it learns, its weights load strictly, and it resumes."""

import logging

import numpy as np
import torch

from chaid.models import build_model, build_parts
from chaid.shapes.prompts import describe
from chaid.shapes.train_dit import (
    CHECKPOINT,
    DitTrainConfig,
    build_latent_dataset,
    flow_loss,
    train_dit,
)

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
    latents, scenes = build_latent_dataset(parts, cfg, rng)
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
    caplog.set_level(logging.INFO, logger="chaid.shapes.train_dit")
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
