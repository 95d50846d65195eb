"""Training the Shapes VAE: latent normalisation, training steps, the shipped weights on renders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chaid.models.shapes_vae import (
    SHAPES_VAE_WEIGHTS,
    ShapesVAE,
    ShapesVAEConfig,
    load_shapes_vae,
)
from chaid_lab.shapes.data import psnr, render_batch
from chaid_lab.shapes.train_vae import (
    STATS_STREAM,
    VAETrainConfig,
    fit_latent_statistics,
    train_vae,
    vae_loss,
)

# A narrow copy of the architecture: the same code paths, a fraction of the compute.
TINY = ShapesVAEConfig(width_high=16, width_low=16, groups=8)


# Every test here runs with one torch thread (see the root conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_fitted_statistics_normalise_the_latent():
    torch.manual_seed(0)
    vae = ShapesVAE(TINY).eval()
    fit_latent_statistics(vae, seed=3, clips=8, batch_size=8)
    batch = render_batch(np.random.default_rng(3 + STATS_STREAM), 8)
    z = vae.encode(batch.video).transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(4), atol=1e-3, rtol=0)
    torch.testing.assert_close(z.std(dim=1), torch.ones(4), atol=1e-3, rtol=0)


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    vae = ShapesVAE(TINY).train()
    cfg = VAETrainConfig()
    batch = render_batch(np.random.default_rng(0), 1, frames=4, height=32, width=32)
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, _ = vae_loss(vae, batch.video, batch.objects, cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_train_vae_end_to_end_writes_loadable_weights(tmp_path):
    cfg = VAETrainConfig(
        steps=2, batch_size=1, stats_clips=1, eval_clips=1, warmup_steps=1, threads=1
    )
    report = train_vae(tmp_path, seed=0, cfg=cfg, model_cfg=TINY)
    assert report["steps"] == 2 and np.isfinite(report["psnr_db"])
    vae = load_shapes_vae(tmp_path / "vae.safetensors", TINY)
    assert vae.latent_scale.dtype == torch.float32


@pytest.mark.skipif(not SHAPES_VAE_WEIGHTS.is_file(), reason="no shipped VAE weights")
def test_shipped_vae_reconstructs_held_out_renders():
    vae = load_shapes_vae()
    batch = render_batch(np.random.default_rng(12345), 4, with_masks=False)
    z = vae.encode(batch.video)
    assert z.shape == (4, 4, 8, 8, 8)
    recon = vae.decode(z, 16)
    assert psnr(batch.video, recon) > MIN_SHIPPED_PSNR
    # Normalised: about unit scale per channel, as the DiT's rectified flow assumes.
    std = z.transpose(0, 1).reshape(4, -1).std(dim=1)
    assert ((std > 0.5) & (std < 2.0)).all()


# Floor for the shipped VAE's reconstruction PSNR (dB) on a handful of clips.
MIN_SHIPPED_PSNR = 20.0


