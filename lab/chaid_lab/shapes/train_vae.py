"""Training the Shapes VAE: renders in, reconstructions out, a KL autoencoder's objective.

``train_vae`` is seeded end to end (initial weights from torch's generator, scenes from
numpy's), so the same arguments on the same machine give the same weights. The loss is a
mean squared error weighted up where objects are (the judge, and people, read the objects:
a grass blade lost costs less than a triangle's corner) plus a small KL term that keeps the
latent smooth around the encoder's mean. After training, the per-channel mean and standard
deviation of encoded renders become the latent shift and scale, so latents have about unit
variance, and the reconstruction PSNR on held-out renders goes into the file's metadata.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from chaid.models.shapes_vae import SHAPES_VAE_WEIGHTS, ShapesVAE, ShapesVAEConfig
from chaid.models.weights import save_weights
from chaid_lab.shapes.data import psnr, render_batch

log = logging.getLogger(__name__)

# Seed offsets of the scene streams, so training, statistics and evaluation never share a
# scene for any seed.
STATS_STREAM = 1_000_003
EVAL_STREAM = 2_000_003


@dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 2500
    # Clips per step: 8 clips of 16×64×64 take about half a second on one CPU core.
    batch_size: int = 8
    learning_rate: float = 2e-3
    # Linear warm-up, then cosine decay to min_lr_fraction of the peak.
    warmup_steps: int = 100
    min_lr_fraction: float = 0.05
    # Extra loss weight on pixels covered by an object (1 + object_weight there).
    object_weight: float = 4.0
    # KL weight per latent element relative to the per-pixel squared error: small, so the
    # latent carries detail, but enough that nearby latents decode to similar videos.
    kl_weight: float = 2e-5
    # Clips whose encoded means set the latent shift and scale, and clips for the PSNR.
    stats_clips: int = 128
    eval_clips: int = 64
    log_every: int = 50
    # CPU threads. One: on a CPU shared with other jobs, OpenMP workers that wait for each
    # other at every barrier made two threads ten times slower than one.
    threads: int = 1


def _learning_rate(cfg: VAETrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.min_lr_fraction
    return cfg.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def vae_loss(
    vae: ShapesVAE, video: torch.Tensor, objects: torch.Tensor, cfg: VAETrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, plain reconstruction MSE) of one batch."""
    mean, logvar = vae.encode_moments(video)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
    recon = vae.decode_raw(z, video.shape[2])
    # Dilate object coverage by a pixel so outlines and edges count as the object.
    near_object = F.max_pool3d(objects, (1, 3, 3), stride=1, padding=(0, 1, 1))
    error = (recon - video).pow(2)
    weighted = (error * (1.0 + cfg.object_weight * near_object)).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return weighted + cfg.kl_weight * kl, error.mean().detach()


@torch.no_grad()
def fit_latent_statistics(vae: ShapesVAE, seed: int, clips: int, batch_size: int = 16) -> None:
    """Set latent_shift/latent_scale to the per-channel mean/std of encoded renders."""
    rng = np.random.default_rng(seed + STATS_STREAM)
    means = []
    for start in range(0, clips, batch_size):
        batch = render_batch(rng, min(batch_size, clips - start))
        means.append(vae.encode_moments(batch.video)[0])
    z = torch.cat(means).transpose(0, 1).reshape(vae.latent_channels, -1)
    vae.latent_shift.copy_(z.mean(dim=1))
    vae.latent_scale.copy_(z.std(dim=1).clamp_min(1e-6))


@torch.no_grad()
def evaluate_vae(vae: ShapesVAE, seed: int, clips: int, batch_size: int = 16) -> dict[str, float]:
    """Reconstruction PSNR (dB, through encode → decode with clamping) and the per-channel
    latent mean/std on held-out renders."""
    rng = np.random.default_rng(seed + EVAL_STREAM)
    errors, latents = [], []
    for start in range(0, clips, batch_size):
        batch = render_batch(rng, min(batch_size, clips - start))
        z = vae.encode(batch.video)
        recon = vae.decode(z, batch.video.shape[2])
        # Quantise as a written video would be.
        recon = ((recon + 1) * 127.5).round() / 127.5 - 1
        errors.append(recon - batch.video)
        latents.append(z)
    error = torch.cat(errors)
    z = torch.cat(latents).transpose(0, 1).reshape(vae.latent_channels, -1)
    return {
        "psnr_db": psnr(torch.zeros_like(error), error),
        "latent_mean": [round(v, 3) for v in z.mean(dim=1).tolist()],
        "latent_std": [round(v, 3) for v in z.std(dim=1).tolist()],
    }


def train_vae(
    out: str | Path = SHAPES_VAE_WEIGHTS,
    *,
    seed: int = 0,
    cfg: VAETrainConfig | None = None,
    model_cfg: ShapesVAEConfig | None = None,
) -> dict:
    """Train the Shapes VAE from scratch and write its weights (fp16 safetensors) to ``out``.

    Args:
        out: a .safetensors path (its directory is created) or a directory (→ vae.safetensors).
        seed: seeds the initial weights and every scene drawn.
        cfg: training settings; model_cfg: the architecture (default: the shipped one).

    Returns a report: steps, seconds, final training MSE, held-out PSNR and latent stats,
    and the file written. Progress goes to the ``chaid_lab.shapes.train_vae`` logger.
    """
    cfg = cfg or VAETrainConfig()
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out / "vae.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    vae = ShapesVAE(model_cfg).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    n_params = sum(p.numel() for p in vae.parameters())
    log.info("training the Shapes VAE (%d parameters) for %d steps", n_params, cfg.steps)

    # 1. optimise
    start = time.perf_counter()
    recent: list[float] = []
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(cfg, step)
        batch = render_batch(rng, cfg.batch_size)
        loss, mse = vae_loss(vae, batch.video, batch.objects, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        recent.append(mse.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean_mse = float(np.mean(recent))
            log.info(
                "step %d/%d  mse %.5f  psnr %.2f dB  %.0f s",
                step + 1,
                cfg.steps,
                mean_mse,
                10 * math.log10(4.0 / mean_mse),
                time.perf_counter() - start,
            )
            recent.clear()
    seconds = time.perf_counter() - start

    # 2. normalise the latent, 3. save in fp16, 4. evaluate the saved weights
    vae.eval()
    fit_latent_statistics(vae, seed, cfg.stats_clips)
    report = {
        "steps": cfg.steps,
        "seed": seed,
        "seconds": round(seconds, 1),
        "parameters": n_params,
        "train_config": asdict(cfg),
    }
    save_weights(vae.half(), out, metadata={"seed": str(seed), "steps": str(cfg.steps)})
    from chaid.models.shapes_vae import load_shapes_vae

    report.update(evaluate_vae(load_shapes_vae(out, model_cfg), seed, cfg.eval_clips))
    report["weights"] = str(out)
    log.info("held-out PSNR %.2f dB; wrote %s", report["psnr_db"], out)
    return report


def cli_train(out: Path | None, seed: int, steps: int | None) -> dict:
    """``chaid-lab shapes train vae``: the default run, optionally with other steps."""
    cfg = VAETrainConfig() if steps is None else VAETrainConfig(steps=steps)
    return train_vae(SHAPES_VAE_WEIGHTS if out is None else out, seed=seed, cfg=cfg)
