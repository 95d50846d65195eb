"""Batches of rendered scenes as tensors, for training and evaluating the Shapes networks.

Rendering a 16×64×64 clip takes a few milliseconds, so batches are drawn on the fly from a
seeded generator: a training run sees fresh scenes every step and needs no dataset on disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from chaid_lab.shapes.world import (
    DEFAULT_DISTRIBUTION,
    LABEL_KEYS,
    SceneDistribution,
    labels,
    render,
    render_with_masks,
    sample_scene,
)

# The embedded default's video size: the VAE and the DiT are built around it.
FRAMES = 16
HEIGHT = 64
WIDTH = 64


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run numpy rendering and small tensor ops with one torch thread, then restore.

    Between torch's parallel regions its OpenMP workers spin waiting for work; while numpy
    renders in the main thread they take its CPU, and rendering runs several times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Batch:
    # (B, 3, F, H, W) float32 in [-1, 1].
    video: torch.Tensor
    # (B, 1, F, H, W) float32 in [0, 1]: where any object is visible (None if not asked).
    objects: torch.Tensor | None
    # LABEL_KEYS → (B,) int64 labels, as chaid_lab.shapes.world.labels gives them.
    labels: dict[str, torch.Tensor]


def to_tensor(video: np.ndarray) -> torch.Tensor:
    """uint8 frames (F, H, W, 3) → float32 (3, F, H, W) in [-1, 1]."""
    return torch.from_numpy(video).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """float (3, F, H, W) in [-1, 1] → uint8 frames (F, H, W, 3)."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def render_batch(
    rng: np.random.Generator,
    size: int,
    frames: int = FRAMES,
    height: int = HEIGHT,
    width: int = WIDTH,
    distribution: SceneDistribution = DEFAULT_DISTRIBUTION,
    with_masks: bool = True,
) -> Batch:
    """``size`` scenes drawn from the distribution by rng alone, rendered and labelled;
    object coverage too if ``with_masks`` (it doubles the rendering time)."""
    videos, masks, targets = [], [], {key: [] for key in LABEL_KEYS}
    with single_threaded():
        for _ in range(size):
            scene = sample_scene(rng, distribution)
            if with_masks:
                video, mask = render_with_masks(scene, frames, height, width)
                masks.append(torch.from_numpy(mask.max(axis=1))[None])  # (1, F, H, W)
            else:
                video = render(scene, frames, height, width)
            videos.append(to_tensor(video))
            for key, value in labels(scene).items():
                targets[key].append(value)
    return Batch(
        video=torch.stack(videos),
        objects=torch.stack(masks) if with_masks else None,
        labels={key: torch.tensor(values, dtype=torch.int64) for key, values in targets.items()},
    )


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of videos in [-1, 1] (peak = the full range)."""
    mse = (reference.float() - estimate.float()).pow(2).mean().item() / 4.0
    return float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))
