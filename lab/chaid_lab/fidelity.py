"""Fidelity metrics beside the judge: what a generated video loses that a label cannot say.

The judge asks "does the video show the prompt?" (shape, colour, background, motion). A
few-step sampler can pass that and still be blurrier, flicker, or drift from what the full
schedule would have drawn. Each metric here catches one of those:

==========================  ===========================================  ====================
metric                      catches                                      reference
==========================  ===========================================  ====================
``fd`` (Fréchet distance)   the distribution of whole videos drifting    true renders of the
and ``kid`` (kernel         from the world's (wrong textures, counts,    same scenes (the
inception distance, x1e3)   motion styles), in the judge's feature        world renders every
                            space: an FVD analogue with ground truth     prompt's scene)
``psnr``, ``ssim``          pixel and structure error against what the   the same-seed full-30
                            full schedule draws from the same noise      video
``hf_ratio``                lost detail: high-frequency energy of the    the true render
                            frames relative to the true render's (1 is
                            as sharp as the world, below 1 is blur)
``motion_error``            temporal consistency: how far the mean       the true render
                            frame-to-frame change is from the world's
                            (flicker above, a frozen clip below)
``jump_excess``             a jump the world never makes (an object      the true render
                            teleporting or splitting): the largest
                            frame-to-frame change above the clip's own
                            median change, minus the same for truth
==========================  ===========================================  ====================

Frame changes are mean absolute luma differences in [0, 1]; they are compared as
differences, not ratios, because a still object over a still background changes by ~0.

PSNR and SSIM come from torchmetrics. The distances work in a feature space fitted to the
true renders (:func:`feature_space`): the judge's features projected on the renders'
leading principal components (over 90% of their variance), so that a few hundred videos
estimate a full-rank covariance, and divided by one common scale so KID's kernel stays in
range. A per-feature standardisation would not do: some features barely vary over the
renders, and dividing by that spread turns noise into distance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

# Spatial frequencies above this fraction of the Nyquist frequency count as detail: edges
# and texture, not the layout of a 64-pixel frame.
HF_CUTOFF = 0.5
# KID's polynomial kernel (x·y / d + 1)^3 over subsets of this many videos per side.
KID_SUBSET = 100
KID_SUBSETS = 50
# Principal components of the true renders' features the distances use: well below the few
# hundred videos of a run, so covariances are estimated with room to spare.
FEATURE_DIMS = 32


def _frames(video: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, 3) → float (F, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).float() / 255.0


def psnr(video: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of uint8 frames against a reference of the same shape."""
    return float(peak_signal_noise_ratio(_frames(video), _frames(reference), data_range=1.0))


def ssim(video: np.ndarray, reference: np.ndarray) -> float:
    """Mean SSIM over frames (Gaussian window 11, sigma 1.5) against a reference."""
    return float(structural_similarity_index_measure(_frames(video), _frames(reference),
                                                     data_range=1.0))


def _luma(video: np.ndarray) -> np.ndarray:
    return (video.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / 255.0  # (F, H, W)


def high_frequency_energy(video: np.ndarray, cutoff: float = HF_CUTOFF) -> float:
    """Mean spectral energy of the frames' luma above ``cutoff`` of Nyquist (radially)."""
    luma = _luma(video)
    luma = luma - luma.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(luma)) ** 2
    fy = np.fft.fftfreq(luma.shape[1])[:, None] / 0.5
    fx = np.fft.fftfreq(luma.shape[2])[None, :] / 0.5
    mask = np.sqrt(fy**2 + fx**2) > cutoff
    return float(power[:, mask].mean())


def high_frequency_ratio(video: np.ndarray, truth: np.ndarray) -> float:
    """High-frequency energy of ``video`` over that of the true render (1: as detailed)."""
    return high_frequency_energy(video) / max(high_frequency_energy(truth), 1e-12)


def _frame_changes(video: np.ndarray) -> np.ndarray:
    """Mean absolute luma change between consecutive frames, one value per step."""
    luma = _luma(video)
    return np.abs(np.diff(luma, axis=0)).mean(axis=(1, 2))


def motion_error(video: np.ndarray, truth: np.ndarray) -> float:
    """|mean frame-to-frame change − the true render's|: 0 moves like the world."""
    return float(abs(_frame_changes(video).mean() - _frame_changes(truth).mean()))


def spike(video: np.ndarray) -> float:
    """The clip's largest frame-to-frame change above its median change."""
    changes = _frame_changes(video)
    return float(changes.max() - np.median(changes))


def jump_excess(video: np.ndarray, truth: np.ndarray) -> float:
    """The clip's largest frame-to-frame change above its median change, minus the true
    render's: well above 0 is a jump the world does not make."""
    return spike(video) - spike(truth)


@torch.no_grad()
def judge_features(videos: Sequence[np.ndarray], judge=None, batch: int = 32) -> np.ndarray:
    """The judge's pooled features (its heads' input) of uint8 videos, (N, D) float64."""
    from chaid_lab.shapes.judge import load_judge, prepare

    judge = judge or load_judge()
    out = []
    for i in range(0, len(videos), batch):
        x = prepare(np.stack(videos[i:i + batch]))
        out.append(judge.features(x).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


@dataclass(frozen=True)
class FeatureSpace:
    """The true renders' leading principal components and one common scale."""

    mean: np.ndarray
    components: np.ndarray  # (D, dims), orthonormal columns
    scale: float

    def project(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean) @ self.components / self.scale


def feature_space(truth: np.ndarray, dims: int = FEATURE_DIMS) -> FeatureSpace:
    """The space of this module's distances, fitted to the true renders' features (N, D)."""
    mean = truth.mean(axis=0)
    _, sv, vt = np.linalg.svd(truth - mean, full_matrices=False)
    dims = max(1, min(dims, len(truth) - 1, vt.shape[0]))
    # One scale for every component: the renders' mean variance per kept component.
    scale = float(np.sqrt(max((sv[:dims] ** 2).sum() / max(len(truth) - 1, 1) / dims, 1e-12)))
    return FeatureSpace(mean, vt[:dims].T, scale)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D).

    tr((Σa Σb)^½) is the sum of the square roots of the eigenvalues of Σa Σb (real and
    non-negative for covariance matrices), which avoids a matrix square root.
    """
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    eig = np.linalg.eigvals(cov_a @ cov_b)
    root_trace = float(np.sqrt(np.clip(eig.real, 0.0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * root_trace)


def kernel_distance(a: np.ndarray, b: np.ndarray, subset: int = KID_SUBSET,
                    subsets: int = KID_SUBSETS, seed: int = 0) -> float:
    """Kernel (inception) distance: the unbiased squared MMD with the cubic polynomial
    kernel, averaged over random subsets; unbiased, so it is comparable across sizes."""
    rng = np.random.default_rng(seed)
    m = min(subset, len(a), len(b))
    if m < 2:
        return float("nan")
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        values.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                      + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(values))


def per_video(video: np.ndarray, truth: np.ndarray, full: np.ndarray | None) -> dict[str, float]:
    """The per-video metrics of one generated clip: against truth, and against the same-seed
    full-30 video when given (PSNR is inf for the full-30 video itself)."""
    out = {
        "hf_ratio": high_frequency_ratio(video, truth),
        "motion_error": motion_error(video, truth),
        "jump_excess": jump_excess(video, truth),
    }
    if full is not None:
        out["psnr"] = psnr(video, full)
        out["ssim"] = ssim(video, full)
    return out


# Object tracking of lab/chaid_lab/shapes/defects.py: a pixel is foreground when its RGB
# differs from the clip's per-pixel temporal median (the background, since objects move) by
# more than TRACK_DIFF in sum; foreground blobs under TRACK_MIN_AREA pixels are texture,
# and so are blobs thinner than TRACK_MIN_SIDE pixels (the bounding box's short side): a
# wave crest or a dune's edge that moves or flickers, where the smallest object is 14 px
# across.
TRACK_DIFF = 60
TRACK_MIN_AREA = 40
TRACK_MIN_SIDE = 6


def largest_blob_jump(video: np.ndarray) -> float:
    """The largest frame-to-frame move, in pixels, of the clip's largest moving blob: an
    object that teleports (or splits, the larger half landing elsewhere) moves far more
    in one frame than the world's fastest bounce (about 6 px a frame at 64x64)."""
    from scipy import ndimage

    v = video.astype(np.int16)
    diff = np.abs(v - np.median(v, axis=0)).sum(axis=-1)
    centres: list[tuple[float, float] | None] = []
    for frame in diff:
        mask = ndimage.binary_opening(frame > TRACK_DIFF)
        labels, count = ndimage.label(mask)
        if not count:
            centres.append(None)
            continue
        areas = ndimage.sum(mask, labels, range(1, count + 1))
        for i, box in enumerate(ndimage.find_objects(labels)):
            if min(box[0].stop - box[0].start, box[1].stop - box[1].start) < TRACK_MIN_SIDE:
                areas[i] = 0  # a stripe of texture
        best = int(np.argmax(areas))
        centres.append(ndimage.center_of_mass(mask, labels, best + 1)
                       if areas[best] >= TRACK_MIN_AREA else None)
    moves = [float(np.hypot(a[0] - b[0], a[1] - b[1]))
             for a, b in zip(centres, centres[1:], strict=False) if a is not None and b is not None]
    return max(moves, default=0.0)

