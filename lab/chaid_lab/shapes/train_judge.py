"""Training and validating the judge on renders, clean and degraded.

Each step draws fresh scenes, degrades some of them (Gaussian blur, pixel noise) and, when
a trained VAE is given, mixes in VAE reconstructions from a pool encoded once at the start,
so the judge reads generated videos (blurrier, with codec-like artefacts) as well as
renders. Seeded end to end: the same arguments give the same weights.
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

from chaid.models.weights import save_weights
from chaid_lab.shapes.data import (
    FRAMES,
    HEIGHT,
    WIDTH,
    Batch,
    render_batch,
    single_threaded,
    to_tensor,
    to_uint8,
)
from chaid_lab.shapes.judge import (
    JUDGE_WEIGHTS,
    OBJECT_HEADS,
    ShapesJudge,
    _suffix,
    prepare,
    score,
)
from chaid_lab.shapes.prompts import canonical
from chaid_lab.shapes.world import NO_OBJECT, render, sample_scene

log = logging.getLogger(__name__)

# Seed offsets of the scene streams (disjoint from each other and from the VAE's).
POOL_STREAM = 3_000_017
EVAL_STREAM = 4_000_037


@dataclass(frozen=True)
class JudgeTrainConfig:
    steps: int = 2500
    # Fresh renders per step, and VAE reconstructions from the pool per step (if a VAE).
    batch_size: int = 32
    pool_batch: int = 16
    # Reconstructions encoded once at the start: encoding every step would cost more than
    # training the judge.
    pool_clips: int = 512
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 1e-4
    # Share of fresh renders blurred, and the blur's standard deviation range (pixels of the
    # judge's 32×32 view); share given Gaussian pixel noise, and its range (in [-1, 1] units).
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.2, 1.0)
    noise_prob: float = 0.5
    noise_std: tuple[float, float] = (0.01, 0.12)
    log_every: int = 50
    # CPU threads; one, for the reason given in chaid_lab.shapes.train_vae.VAETrainConfig.
    threads: int = 1


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2.5 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur(video: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of each frame of (3, F, H, W), reflecting at the edges."""
    k = _gaussian_kernel(sigma)
    r = k.numel() // 2
    x = video.transpose(0, 1)  # (F, 3, H, W)
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return x.transpose(0, 1)


def degrade(video: torch.Tensor, gen: torch.Generator, cfg: JudgeTrainConfig) -> torch.Tensor:
    """Blur and/or noise judge inputs (B, 3, F, H, W) in [-1, 1], each clip by its own draw."""
    with single_threaded():
        return torch.stack([_degrade_clip(clip, gen, cfg) for clip in video])


def _degrade_clip(clip: torch.Tensor, gen: torch.Generator, cfg: JudgeTrainConfig) -> torch.Tensor:
    u = torch.rand(4, generator=gen).tolist()
    if u[0] < cfg.blur_prob:
        lo, hi = cfg.blur_sigma
        clip = blur(clip, lo + (hi - lo) * u[1])
    if u[2] < cfg.noise_prob:
        lo, hi = cfg.noise_std
        clip = clip + (lo + (hi - lo) * u[3]) * torch.randn(clip.shape, generator=gen)
    return clip.clamp(-1, 1)


def _object_loss(
    logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], slot: int, obj: int
) -> torch.Tensor:
    """Per-clip cross-entropy of predicted slot ``slot`` against scene object ``obj``."""
    total = torch.zeros(next(iter(logits.values())).shape[0])
    for attribute in OBJECT_HEADS:
        target = labels[f"{attribute}{_suffix(obj)}"].clamp_min(0)
        total = total + F.cross_entropy(
            logits[f"{attribute}{_suffix(slot)}"], target, reduction="none"
        )
    return total


def judge_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Background + count + object attributes, objects matched to slots the better way."""
    loss = F.cross_entropy(logits["background"], labels["background"])
    loss = loss + F.cross_entropy(logits["num_objects"], labels["num_objects"] - 1)
    single = _object_loss(logits, labels, 0, 0)
    direct = single + _object_loss(logits, labels, 1, 1)
    swapped = _object_loss(logits, labels, 0, 1) + _object_loss(logits, labels, 1, 0)
    two = labels["shape_2"] != NO_OBJECT
    objects = torch.where(two, torch.minimum(direct, swapped), single)
    return loss + objects.mean()


@torch.no_grad()
def reconstruction_pool(vae, seed: int, clips: int, batch_size: int = 16) -> tuple:
    """(judge inputs of VAE reconstructions, their labels) for ``clips`` fresh scenes."""
    rng = np.random.default_rng(seed + POOL_STREAM)
    inputs, labels = [], []
    for start in range(0, clips, batch_size):
        batch = render_batch(rng, min(batch_size, clips - start), with_masks=False)
        recon = vae.decode(vae.encode(batch.video), batch.video.shape[2])
        inputs.append(prepare(recon))
        labels.append(batch.labels)
    merged = {k: torch.cat([lab[k] for lab in labels]) for k in labels[0]}
    return torch.cat(inputs), merged


@torch.no_grad()
def evaluate_judge(judge: ShapesJudge, batches: list[Batch], vae=None) -> dict[str, float]:
    """Held-out accuracy per attribute; objects matched to slots the better way per clip.

    ``shape``/``colour``/``motion`` count every object of every clip; ``*_single`` only the
    objects of one-object clips. With ``vae``, the clips are judged after a VAE round trip.
    """
    hits: dict[str, list[float]] = {}

    def add(key: str, values: torch.Tensor) -> None:
        hits.setdefault(key, []).extend(values.float().tolist())

    for batch in batches:
        video = batch.video
        if vae is not None:
            video = vae.decode(vae.encode(video), video.shape[2])
        logits = judge(prepare(video))
        labels = batch.labels
        add("background", logits["background"].argmax(1) == labels["background"])
        add("num_objects", logits["num_objects"].argmax(1) + 1 == labels["num_objects"])
        two = labels["shape_2"] != NO_OBJECT
        swap = two & (
            _object_loss(logits, labels, 0, 1) + _object_loss(logits, labels, 1, 0)
            < _object_loss(logits, labels, 0, 0) + _object_loss(logits, labels, 1, 1)
        )
        for attribute in OBJECT_HEADS:
            first, second = labels[attribute], labels[f"{attribute}_2"]
            slot_a = logits[attribute].argmax(1)
            slot_b = logits[f"{attribute}_2"].argmax(1)
            add(attribute, torch.where(swap, slot_b, slot_a) == first)
            add(attribute, (torch.where(swap, slot_a, slot_b) == second)[two])
            add(f"{attribute}_single", (slot_a == first)[~two])
    return {k: round(float(np.mean(v)), 4) for k, v in hits.items()}


@torch.no_grad()
def validate_scores(judge: ShapesJudge, seed: int, clips: int, vae=None) -> dict[str, float]:
    """Mean :func:`~chaid_lab.shapes.judge.score` of held-out scenes against their canonical
    prompts: rendered, through the VAE (if given), and of uniform noise frames instead."""
    rng = np.random.default_rng(seed + EVAL_STREAM + 1)
    scores: dict[str, list[float]] = {"clean": [], "noise": []}
    if vae is not None:
        scores["vae"] = []
    for _ in range(clips):
        batch_rng = np.random.default_rng(rng.integers(2**63))
        scene = sample_scene(batch_rng)
        prompt = canonical(scene)
        video = render(scene, FRAMES, HEIGHT, WIDTH)
        scores["clean"].append(score(video, prompt, judge)["overall"])
        if vae is not None:
            x = to_tensor(video)[None]
            recon = to_uint8(vae.decode(vae.encode(x), FRAMES)[0])
            scores["vae"].append(score(recon, prompt, judge)["overall"])
        noise = batch_rng.integers(0, 256, video.shape, dtype=np.uint8)
        scores["noise"].append(score(noise, prompt, judge)["overall"])
    return {k: round(float(np.mean(v)), 4) for k, v in scores.items()}


def held_out_batches(seed: int, clips: int, batch_size: int = 50) -> list[Batch]:
    rng = np.random.default_rng(seed + EVAL_STREAM)
    return [
        render_batch(rng, min(batch_size, clips - s), with_masks=False)
        for s in range(0, clips, batch_size)
    ]


def train_judge(
    out: str | Path = JUDGE_WEIGHTS,
    *,
    seed: int = 0,
    cfg: JudgeTrainConfig | None = None,
    vae=None,
    eval_clips: int = 500,
    score_clips: int = 200,
) -> dict:
    """Train the judge from scratch and write its weights (fp16 safetensors) to ``out``.

    Args:
        out: a .safetensors path or a directory (→ judge.safetensors).
        seed: seeds the initial weights, the scenes and the degradations.
        cfg: training settings.
        vae: a trained VideoAutoencoder whose reconstructions join training, and on whose
            reconstructions the judge is also validated; None trains on renders alone.
        eval_clips: held-out clips for the accuracies in the report; score_clips: held-out
            scenes whose mean score against their canonical prompts it reports.

    Returns a report with held-out accuracies (clean, and through the VAE if given).
    """
    cfg = cfg or JudgeTrainConfig()
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out / "judge.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    judge = ShapesJudge().train()
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(
        judge.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    pool = None
    start = time.perf_counter()
    if vae is not None and cfg.pool_clips > 0:
        pool = reconstruction_pool(vae, seed, cfg.pool_clips)
        log.info(
            "encoded %d VAE reconstructions in %.0f s", cfg.pool_clips, time.perf_counter() - start
        )
    log.info(
        "training the judge (%d parameters) for %d steps",
        sum(p.numel() for p in judge.parameters()),
        cfg.steps,
    )

    # 1. optimise
    recent: list[float] = []
    for step in range(cfg.steps):
        progress = max(0.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        lr = cfg.learning_rate * min(1.0, (step + 1) / cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * progress))
        batch = render_batch(rng, cfg.batch_size, with_masks=False)
        inputs, labels = degrade(prepare(batch.video), gen, cfg), batch.labels
        if pool is not None:
            pick = torch.randint(len(pool[0]), (cfg.pool_batch,), generator=gen)
            inputs = torch.cat([inputs, pool[0][pick]])
            labels = {k: torch.cat([v, pool[1][k][pick]]) for k, v in labels.items()}
        loss = judge_loss(judge(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log.info(
                "step %d/%d  loss %.4f  %.0f s",
                step + 1,
                cfg.steps,
                np.mean(recent),
                time.perf_counter() - start,
            )
            recent.clear()
    seconds = time.perf_counter() - start

    # 2. save in fp16, 3. validate the saved weights
    save_weights(judge.half(), out, metadata={"seed": str(seed), "steps": str(cfg.steps)})
    from chaid_lab.shapes.judge import load_judge

    saved = load_judge(out)
    batches = held_out_batches(seed, eval_clips)
    report = {
        "steps": cfg.steps,
        "seed": seed,
        "seconds": round(seconds, 1),
        "train_config": asdict(cfg),
        "accuracy_clean": evaluate_judge(saved, batches),
        "weights": str(out),
    }
    if vae is not None:
        report["accuracy_vae"] = evaluate_judge(saved, batches, vae)
    report["mean_score"] = validate_scores(saved, seed, score_clips, vae)
    log.info("held-out accuracy (clean): %s", report["accuracy_clean"])
    return report


def cli_train(out: Path | None, seed: int, steps: int | None) -> dict:
    """``chaid-lab shapes train judge``: the default run with the shipped VAE's reconstructions
    (renders alone when no VAE weights are shipped), optionally with other steps."""
    from chaid.errors import WeightsError
    from chaid.models.shapes_vae import load_shapes_vae

    cfg = JudgeTrainConfig() if steps is None else JudgeTrainConfig(steps=steps)
    try:
        vae = load_shapes_vae()
    except WeightsError as exc:
        log.warning("training on renders alone: %s", exc)
        vae = None
    return train_judge(JUDGE_WEIGHTS if out is None else out, seed=seed, cfg=cfg, vae=vae)
