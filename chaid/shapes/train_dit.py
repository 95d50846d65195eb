"""Training the Shapes STDiT3 with OpenSora 1.2's rectified-flow objective.

1. Dataset: ``dataset_size`` scenes are drawn from the Shapes world (without the held-out
   combinations of chaid/shapes/heldout.py), rendered and encoded
   by the (frozen) VAE once; ``prompts_per_scene`` phrasings of each scene are encoded by
   the (frozen) text encoder once. Both are kept in memory as fp16; a step draws a scene
   and one of its phrasings.
2. Step: a batch of latents x0, noise ε, t from a logit-normal passed through the same
   timestep transform the sampler uses; x_t = (1 - t/1000)·x0 + (t/1000)·ε; the first
   in_channels outputs regress v = x0 - ε (MSE). A fraction of captions is replaced by the
   DiT's null caption (with the prompt's mask), which is what guidance subtracts at
   inference.
3. AdamW with linear warm-up, gradient clipping and an EMA of the weights; the EMA is what
   gets shipped.
4. A checkpoint (model, EMA, optimiser, step, RNG) is written atomically every
   ``checkpoint_every`` steps; a run started again with the same output directory resumes
   from it, so an interrupted run loses at most that many steps.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from chaid.engine.sampler import NUM_TIMESTEPS, timestep_transform, transform_ratio
from chaid.models import ModelParts, build_parts
from chaid.models.text import TextEmbedding
from chaid.models.weights import save_weights
from chaid.shapes.heldout import TRAINING_DISTRIBUTION
from chaid.shapes.prompts import describe
from chaid.shapes.world import render, sample_scene

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "dit.safetensors"
# Where `chaid shapes train dit` writes by default: the weights the tiny-shapes preset ships.
SHIPPED_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class DitTrainConfig:
    # Optimiser steps; quality keeps improving long after the loss curve looks flat.
    steps: int = 6000
    # Clips per step: larger is smoother but each step costs proportionally more.
    batch_size: int = 16
    # Peak learning rate after warm-up.
    lr: float = 3e-4
    warmup_steps: int = 200
    # Exponential moving average of the weights: higher is smoother but slower to follow.
    ema_decay: float = 0.999
    # Fraction of captions replaced by the null caption (needed for guidance).
    caption_dropout: float = 0.1
    # Pre-rendered, pre-encoded clips; more clips, less over-fitting, longer start-up.
    dataset_size: int = 8000
    # Phrasings encoded per scene: more, more language variety and more memory
    # (8000 x 2 MiniLM states of 32 x 384 in fp16 is 0.4 GB).
    prompts_per_scene: int = 2
    # Clips rendered and encoded per VAE call while building the dataset.
    encode_batch: int = 64
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 250
    # CPU threads for torch. One thread is robust on a shared machine: with two, OpenMP
    # workers spin against other processes and a step can take many times longer.
    threads: int = 1


@dataclass
class TextBank:
    """Encoded phrasings: states (N, K, L, D) fp16 and masks (N, K, L) for N scenes."""

    prompts: list[list[str]]
    states: torch.Tensor
    mask: torch.Tensor


def build_text_bank(
    parts: ModelParts, scenes: list, per_scene: int, rng: np.random.Generator, chunk: int = 256
) -> TextBank:
    """Write ``per_scene`` phrasings of every scene and encode them once."""
    prompts = [[describe(s, rng) for _ in range(per_scene)] for s in scenes]
    flat = [p for group in prompts for p in group]
    enc = parts.text_encoder
    states = torch.empty((len(flat), enc.max_length, enc.dim), dtype=torch.float16)
    mask = torch.empty((len(flat), enc.max_length), dtype=torch.bool)
    start = time.perf_counter()
    for i in range(0, len(flat), chunk):
        with torch.no_grad():
            text = enc.encode(flat[i : i + chunk])
        states[i : i + chunk] = text.states.to(torch.float16)
        mask[i : i + chunk] = text.mask
        if (i // chunk) % 20 == 0:
            log.info(
                "text: %d/%d prompts encoded (%.0f s)",
                i + chunk,
                len(flat),
                time.perf_counter() - start,
            )
    shape = (len(scenes), per_scene)
    return TextBank(prompts, states.view(*shape, *states.shape[1:]), mask.view(*shape, -1))


def build_latent_dataset(parts: ModelParts, cfg: DitTrainConfig, rng: np.random.Generator):
    """Render and encode ``dataset_size`` clips → (latents fp16 (N, C, T, h, w), scenes)."""
    spec = parts.spec
    scenes = [sample_scene(rng, TRAINING_DISTRIBUTION) for _ in range(cfg.dataset_size)]
    shape = parts.vae.latent_shape(spec.frames, spec.height, spec.width)
    latents = torch.empty((cfg.dataset_size, *shape), dtype=torch.float16)
    start = time.perf_counter()
    for i in range(0, cfg.dataset_size, cfg.encode_batch):
        chunk = scenes[i : i + cfg.encode_batch]
        video = np.stack([render(s, spec.frames, spec.height, spec.width) for s in chunk])
        pixels = torch.from_numpy(video).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        with torch.no_grad():
            latents[i : i + len(chunk)] = parts.vae.encode(pixels).to(torch.float16)
        done = i + len(chunk)
        if done % (cfg.encode_batch * 50) == 0 or done == cfg.dataset_size:
            log.info(
                "dataset: %d/%d clips encoded (%.0f s)",
                done,
                cfg.dataset_size,
                time.perf_counter() - start,
            )
    return latents, scenes


def sample_timesteps(batch: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Logit-normal t in (0, 1000), then the sampler's timestep transform."""
    t = torch.sigmoid(torch.randn(batch, generator=gen)) * NUM_TIMESTEPS
    return timestep_transform(t, ratio)


def flow_loss(
    parts: ModelParts,
    x0: torch.Tensor,
    text: TextEmbedding,
    t: torch.Tensor,
    noise: torch.Tensor,
    drop: torch.Tensor,
) -> torch.Tensor:
    """The rectified-flow loss of one batch (see the module docstring, step 2)."""
    spec, dit = parts.spec, parts.dit
    # clone: an encoder may return inference-mode tensors, which autograd cannot save
    states, mask = text.states.float().clone(), text.mask.clone()
    y = torch.where(drop[:, None, None], dit.null_caption(len(states)), states)
    s = (t / NUM_TIMESTEPS)[:, None, None, None, None]
    x_t = (1 - s) * x0 + s * noise
    out = dit(x_t, t, y, mask, fps=spec.fps, height=spec.height, width=spec.width)
    return torch.mean((out[:, : x0.shape[1]] - (x0 - noise)) ** 2)


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@dataclass
class DitTrainReport:
    weights: Path
    steps: int
    seconds: float
    # Mean training loss over the last 100 steps of this run.
    final_loss: float


def train_dit(
    out_dir: str | Path,
    model: str = "tiny-shapes",
    cfg: DitTrainConfig | None = None,
    checkpoint_dir: str | Path | None = None,
) -> DitTrainReport:
    """Train (or resume training) the DiT of ``model``.

    Writes ``checkpoint.pt`` (resumable state) in ``checkpoint_dir`` (default: out_dir)
    and, at the end, ``dit.safetensors`` (EMA weights, fp16) in ``out_dir``. The preset's
    text encoder and VAE are used frozen.
    """
    cfg = cfg or DitTrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    parts = build_parts(model, init=True)
    dit = parts.dit.train()
    ema = copy.deepcopy(dit).eval().requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=cfg.lr, weight_decay=0.0)
    step = 0
    ckpt_path = ckpt_dir / CHECKPOINT
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        if state["config"] != asdict(cfg):
            log.warning("resuming with a different config than the checkpoint's")
        dit.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        log.info("resumed from %s at step %d", ckpt_path, step)

    # The dataset is a pure function of the seed, so a resumed run rebuilds the same one.
    rng = np.random.default_rng(cfg.seed)
    latents, scenes = build_latent_dataset(parts, cfg, rng)
    bank = build_text_bank(parts, scenes, cfg.prompts_per_scene, rng)
    spec = parts.spec
    ratio = transform_ratio(spec.height, spec.width, latents.shape[2], dit.cfg.input_sq_size)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)

    start, losses = time.perf_counter(), []
    while step < cfg.steps:
        # 1. batch
        idx = torch.randint(0, len(scenes), (cfg.batch_size,), generator=gen)
        x0 = latents[idx].float()
        variant = torch.randint(0, cfg.prompts_per_scene, (cfg.batch_size,), generator=gen)
        text = TextEmbedding(bank.states[idx, variant], bank.mask[idx, variant])
        t = sample_timesteps(cfg.batch_size, ratio, gen)
        noise = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        # 2. step
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        loss = flow_loss(parts, x0, text, t, noise, drop)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), cfg.grad_clip)
        opt.step()
        # 3. EMA
        with torch.no_grad():
            for e, p in zip(ema.parameters(), dit.parameters(), strict=True):
                e.lerp_(p, 1 - cfg.ema_decay)
        step += 1
        losses.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = len(losses) / (time.perf_counter() - start)
            eta = (cfg.steps - step) / rate
            log.info(
                "step %d/%d loss %.4f (%.2f steps/s, %.0f min left)",
                step,
                cfg.steps,
                float(np.mean(losses[-cfg.log_every :])),
                rate,
                eta / 60,
            )
        # 4. checkpoint
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(
                ckpt_path,
                {
                    "model": dit.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "config": asdict(cfg),
                },
            )
    weights = save_weights(ema.half(), out / WEIGHTS, metadata={"model": model, "steps": str(step)})
    final = float(np.mean(losses[-100:])) if losses else math.nan
    log.info("wrote %s after %d steps; last losses %.4f", weights, step, final)
    return DitTrainReport(weights, step, time.perf_counter() - began, final)


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, model: str = "tiny-shapes"
) -> Path:
    """Write the EMA weights of a training checkpoint as ``dit.safetensors`` (fp16).

    The learning rate has no decay, so the checkpoint at step N of a run equals the end of
    a run of N steps with the same config: exporting it ships that run's weights.
    """
    state = torch.load(Path(checkpoint), weights_only=True)
    dit = build_parts(model, init=True).dit
    dit.load_state_dict(state["ema"])
    return save_weights(
        dit.half(), Path(out_dir) / WEIGHTS, metadata={"model": model, "steps": str(state["step"])}
    )


def cli_train(out: Path | None, seed: int, steps: int | None) -> dict:
    """`chaid shapes train dit`: train tiny-shapes; out None writes the shipped weights.

    Resumable checkpoints go beside the weights when ``out`` is given, else to the user's
    cache directory (never into the package).
    """
    cfg = DitTrainConfig(seed=seed, **({"steps": steps} if steps is not None else {}))
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chaid"
    ckpt = out / "checkpoint" if out is not None else cache / f"train-dit-seed{seed}"
    report = train_dit(out or SHIPPED_DIR, "tiny-shapes", cfg, checkpoint_dir=ckpt)
    return {
        "target": "dit",
        "weights": str(report.weights),
        "checkpoint": str(ckpt / CHECKPOINT),
        "steps": report.steps,
        "seconds": round(report.seconds, 1),
        "final_loss": round(report.final_loss, 5),
        "config": asdict(cfg),
    }
