"""Training the Shapes STDiT3 with OpenSora 1.2's rectified-flow objective.

1. Dataset: ``dataset_size`` scenes are drawn from the Shapes world (without the held-out
   combinations of lab/chaid_lab/shapes/heldout.py), rendered and encoded
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
import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from chaid.checks import check_int, check_number
from chaid.engine.sampler import NUM_TIMESTEPS, timestep_transform, transform_ratio
from chaid.errors import ChaidError
from chaid.models import SHAPES_DIT_WEIGHTS, ModelParts, build_parts
from chaid.models.text import TextEmbedding
from chaid.models.weights import load_weights, save_weights
from chaid_lab.shapes.heldout import TRAINING_DISTRIBUTION
from chaid_lab.shapes.prompts import describe
from chaid_lab.shapes.world import MOTIONS, render, render_with_masks, sample_scene

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "dit.safetensors"
# Where `chaid-lab shapes train dit` writes by default: the weights the tiny-shapes preset ships
# (in the model registry's data folder).
SHIPPED_DIR = SHAPES_DIT_WEIGHTS.parent


# Learning-rate schedules after warm-up (see DitTrainConfig.lr_schedule).
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class DitTrainConfig:
    # Optimiser steps; quality keeps improving long after the loss curve looks flat.
    steps: int = 6000
    # Clips per step: larger is smoother but each step costs proportionally more.
    batch_size: int = 16
    # Peak learning rate after warm-up.
    lr: float = 3e-4
    warmup_steps: int = 200
    # After warm-up: "constant", or "cosine" down to lr_final at the last step. A decay
    # settles the weights in the basin a constant rate keeps them bouncing around.
    lr_schedule: str = "constant"
    lr_final: float = 1e-5
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
    # Extra loss weight on latent cells an object covers (and their neighbours): the objects
    # are what the prompt names and where motion lives, but they cover a tenth of the frame,
    # so plain MSE is dominated by background texture. 0 gives the plain rectified-flow MSE.
    object_weight: float = 0.0
    # Share of training scenes with two objects; None keeps the world's default (0.3).
    # Pairs are where the model is weakest (binding each attribute to the right object).
    two_object_prob: float | None = None
    # Weight of bouncing motion against each other motion's 1 in the drawn scenes: a bounce
    # is the one path that folds within a latent frame, and the hardest motion to learn.
    bouncing_weight: float = 1.0
    # Contrast reference R (0: off; needs object_weight): a scene whose objects stand out
    # from their ground by c < R in the latent (object_contrast) has its object weight
    # multiplied by R / c, at most MAX_CONTRAST_BOOST. A low-contrast object (blue over the
    # ocean) moves the plain loss little wherever it is drawn, so the model learns to place
    # it least; the boost gives its cells the pull of a well-separated object's.
    contrast_reference: float = 0.0
    # DiT weights to start from (a safetensors file) instead of the seeded initialisation:
    # a second training stage continues the first one's model with a fresh optimiser.
    init: str | None = None
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 250
    # CPU threads for torch. One thread is robust on a shared machine: with two, OpenMP
    # workers spin against other processes and a step can take many times longer.
    threads: int = 1

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"unknown lr_schedule {self.lr_schedule!r}: use {' or '.join(LR_SCHEDULES)}"
            )
        if self.contrast_reference > 0 and self.object_weight <= 0:
            raise ValueError("contrast_reference scales the object weight: set object_weight")


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


def latent_object_mask(masks: np.ndarray, latent_thw: tuple[int, int, int]) -> torch.Tensor:
    """Which latent cells show an object, grown by one cell in space → bool (T, h, w).

    ``masks`` is render_with_masks' (F, N, H, W) coverage. A cell counts when objects cover
    at least 5% of its pixels in its frames; the one-cell margin keeps the places an object
    moves into and out of in the weighted region, since getting them empty matters as much.
    """
    cover = latent_cover(masks, latent_thw)
    grown = torch.nn.functional.max_pool3d((cover > 0.05).float()[None, None], (1, 3, 3), 1,
                                           (0, 1, 1))
    return grown[0, 0].bool()


def latent_cover(masks: np.ndarray, latent_thw: tuple[int, int, int]) -> torch.Tensor:
    """The share of each latent cell's pixels (in its frames) that objects cover → float
    (T, h, w); ``masks`` is render_with_masks' (F, N, H, W) coverage."""
    t, h, w = latent_thw
    union = torch.from_numpy(masks.max(axis=1) if masks.shape[1] else masks.sum(axis=1))
    frames = union.shape[0]
    if frames % t:  # the VAE repeats the last frame to fill its last latent frame
        pad = t * -(-frames // t) - frames
        union = torch.cat([union, union[-1:].expand(pad, -1, -1)])
    return torch.nn.functional.adaptive_avg_pool3d(union[None, None].float(), (t, h, w))[0, 0]


# A latent cell belongs to an object's core when objects cover this share of its pixels.
CORE_COVER = 0.4
# The most contrast_reference multiplies a scene's object weight by.
MAX_CONTRAST_BOOST = 4.0


def object_contrast(z: torch.Tensor, masks: np.ndarray) -> float | None:
    """How far a scene's objects stand out from their ground in its latent ``z`` (C, T, h, w).

    The distance between the mean latent of the cells objects cover (over CORE_COVER of
    their pixels) and the mean latent of the cells no object comes near, per channel in units
    of those ground cells' standard deviation, then the norm over channels. A textured or
    moving ground (the ocean's crests) has a wide spread, so an object must differ more to
    stand out in it. None when the scene has no core cell or under 4 ground cells.
    """
    thw = tuple(z.shape[1:])
    core = latent_cover(masks, thw) > CORE_COVER
    ground = ~latent_object_mask(masks, thw)
    if not core.any() or ground.sum() < 4:
        return None
    zf = z.float()
    background = zf[:, ground]
    gap = (zf[:, core].mean(1) - background.mean(1)) / background.std(1).clamp_min(1e-3)
    return float(gap.norm())


class LatentDataset(NamedTuple):
    """Encoded training clips: latents fp16 (N, C, T, h, w) and their scenes; object masks
    bool (N, T, h, w) when the loss weights objects, else None; per-clip multipliers of the
    object weight float (N,) when ``contrast_reference`` is set, else None."""

    latents: torch.Tensor
    scenes: list
    masks: torch.Tensor | None
    boost: torch.Tensor | None


def build_latent_dataset(
    parts: ModelParts, cfg: DitTrainConfig, rng: np.random.Generator
) -> LatentDataset:
    """Render and encode ``dataset_size`` clips."""
    spec = parts.spec
    dist = TRAINING_DISTRIBUTION
    if cfg.two_object_prob is not None:
        dist = replace(dist, two_object_prob=cfg.two_object_prob)
    if cfg.bouncing_weight != 1.0:
        dist = replace(dist, motion_weights=tuple(
            cfg.bouncing_weight if m == "bouncing" else 1.0 for m in MOTIONS))
    scenes = [sample_scene(rng, dist) for _ in range(cfg.dataset_size)]
    shape = parts.vae.latent_shape(spec.frames, spec.height, spec.width)
    latents = torch.empty((cfg.dataset_size, *shape), dtype=torch.float16)
    masks = (
        torch.zeros((cfg.dataset_size, *shape[1:]), dtype=torch.bool)
        if cfg.object_weight > 0
        else None
    )
    boost = torch.ones(cfg.dataset_size) if cfg.contrast_reference > 0 else None
    start = time.perf_counter()
    for i in range(0, cfg.dataset_size, cfg.encode_batch):
        chunk = scenes[i : i + cfg.encode_batch]
        if masks is None:
            video = np.stack([render(s, spec.frames, spec.height, spec.width) for s in chunk])
        else:
            rendered = [render_with_masks(s, spec.frames, spec.height, spec.width) for s in chunk]
            video = np.stack([v for v, _ in rendered])
            for k, (_, m) in enumerate(rendered):
                masks[i + k] = latent_object_mask(m, tuple(shape[1:]))
        pixels = torch.from_numpy(video).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        with torch.no_grad():
            latents[i : i + len(chunk)] = parts.vae.encode(pixels).to(torch.float16)
        if boost is not None:
            for k, (_, m) in enumerate(rendered):
                c = object_contrast(latents[i + k], m)
                if c is not None and c < cfg.contrast_reference:
                    boost[i + k] = min(MAX_CONTRAST_BOOST, cfg.contrast_reference / c)
        done = i + len(chunk)
        if done % (cfg.encode_batch * 50) == 0 or done == cfg.dataset_size:
            log.info(
                "dataset: %d/%d clips encoded (%.0f s)",
                done,
                cfg.dataset_size,
                time.perf_counter() - start,
            )
    if boost is not None:
        log.info("contrast: %d of %d clips boosted, mean multiplier %.2f",
                 int((boost > 1).sum()), len(boost), float(boost.mean()))
    return LatentDataset(latents, scenes, masks, boost)


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
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rectified-flow loss of one batch (see the module docstring, step 2).

    ``weight`` (B, T, h, w), if given, weights each latent cell's squared error; the loss is
    divided by the mean weight so its scale stays that of the plain MSE.
    """
    spec, dit = parts.spec, parts.dit
    # clone: an encoder may return inference-mode tensors, which autograd cannot save
    states, mask = text.states.float().clone(), text.mask.clone()
    y = torch.where(drop[:, None, None], dit.null_caption(len(states)), states)
    s = (t / NUM_TIMESTEPS)[:, None, None, None, None]
    x_t = (1 - s) * x0 + s * noise
    out = dit(x_t, t, y, mask, fps=spec.fps, height=spec.height, width=spec.width)
    err = (out[:, : x0.shape[1]] - (x0 - noise)) ** 2
    if weight is None:
        return torch.mean(err)
    return torch.mean(err * weight[:, None]) / torch.mean(weight)


def learning_rate(cfg: DitTrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) under ``cfg``'s schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    # cosine (the config admits no other schedule)
    span = max(1, cfg.steps - 1 - cfg.warmup_steps)
    done = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr_final + (cfg.lr - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * done))


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
    if cfg.init is not None:
        load_weights(parts.dit, cfg.init, dtype=torch.float32)
        log.info("starting from %s", cfg.init)
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
    latents, scenes, object_masks, boost = build_latent_dataset(parts, cfg, rng)
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
            group["lr"] = learning_rate(cfg, step)
        weight = None
        if object_masks is not None:
            scale = cfg.object_weight if boost is None else (
                cfg.object_weight * boost[idx][:, None, None, None])
            weight = 1.0 + scale * object_masks[idx].float()
        loss = flow_loss(parts, x0, text, t, noise, drop, weight)
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

    With the constant schedule the checkpoint at step N of a run equals the end of a run of
    N steps with the same config, so exporting it ships that run's weights; with a decay,
    an early checkpoint is a run whose learning rate had not yet come down.
    """
    state = torch.load(Path(checkpoint), weights_only=True)
    dit = build_parts(model, init=True).dit
    dit.load_state_dict(state["ema"])
    return save_weights(
        dit.half(), Path(out_dir) / WEIGHTS, metadata={"model": model, "steps": str(state["step"])}
    )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def cli_train(
    out: Path | None,
    seed: int,
    steps: int | None,
    *,
    init: Path | None = None,
    object_weight: float | None = None,
    threads: int | None = None,
    lr: float | None = None,
    lr_schedule: str | None = None,
    batch_size: int | None = None,
    two_object_prob: float | None = None,
    bouncing_weight: float | None = None,
    dataset_size: int | None = None,
    contrast_reference: float | None = None,
) -> dict:
    """`chaid-lab shapes train dit`: train tiny-shapes; out None writes the shipped weights.

    Resumable checkpoints go beside the weights when ``out`` is given, else to the user's
    cache directory (never into the package); a stage started from ``init`` keeps its own.
    """
    fields: dict = {"seed": seed}
    if steps is not None:
        fields["steps"] = steps
    if init is not None:
        if not Path(init).is_file():
            raise ChaidError(f"--init {init}: no such weights file")
        fields["init"] = str(init)
    for name, value, check, low, high in (
        ("object_weight", object_weight, check_number, 0.0, 100.0),
        ("threads", threads, check_int, 1, 256),
        ("batch_size", batch_size, check_int, 1, 1024),
        ("dataset_size", dataset_size, check_int, 1, 1_000_000),
        ("two_object_prob", two_object_prob, check_number, 0.0, 1.0),
        ("bouncing_weight", bouncing_weight, check_number, 0.0, 100.0),
        ("contrast_reference", contrast_reference, check_number, 0.0, 100.0),
    ):
        if value is not None:
            fields[name] = check(f"--{name.replace('_', '-')}", value, low, high,
                                 error=ChaidError)
    if lr is not None:
        fields["lr"] = check_number("--lr", lr, 0.0, 1e-2, open_low=True, error=ChaidError)
    if lr_schedule is not None:
        fields["lr_schedule"] = lr_schedule
    if fields.get("contrast_reference", 0) > 0 and fields.get("object_weight", 0) <= 0:
        raise ChaidError("--contrast-reference scales the object weight: give --object-weight")
    cfg = DitTrainConfig(**fields)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chaid"
    # A stage started from other weights keeps its own checkpoint, named by their content.
    stage = f"-from-{_digest(Path(init))}" if init is not None else ""
    ckpt = out / "checkpoint" if out is not None else cache / f"train-dit-seed{seed}{stage}"
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
