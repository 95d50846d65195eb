"""The judge: a small video classifier that reads Shapes labels, and a prompt-based score.

:class:`ShapesJudge` predicts, from a video of any size, the background, the number of
objects (one or two) and the shape, colour and motion of up to two objects. Objects come in
no fixed order: training scores the better of the two ways to match the predicted slots to
the scene's objects, and :func:`score` matches them to the prompt's objects the same way.

:func:`score` reads the attributes a prompt names with :func:`chaid_lab.shapes.prompts.parse`
and reports, per named attribute, the probability the judge gives the named value; the
overall score is their mean, in [0, 1]. Attributes the prompt leaves open are not scored.

Every video is first resampled to :data:`JUDGE_FRAMES` frames of :data:`JUDGE_SIDE` pixels
squared (area averaging), so any frame count and resolution can be judged, and the network
stays cheap.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chaid_lab.shapes.prompts import parse
from chaid_lab.shapes.world import BACKGROUNDS, COLOURS, MOTIONS, SHAPES

# Where the trained judge ships, inside the package.
JUDGE_WEIGHTS = Path(__file__).resolve().parent / "weights" / "judge.safetensors"
# The judge's view of a video: 8 frames still show every motion (the world is designed to
# read at 8 frames); 32×32 pixels keep shapes about 10 pixels wide.
JUDGE_FRAMES = 8
JUDGE_SIDE = 32
# Object attributes and their vocabularies, per slot.
OBJECT_HEADS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "motion": MOTIONS}
# Values of the num_objects head, in order.
OBJECT_COUNTS: tuple[int, ...] = (1, 2)
# Objects the judge describes: the world draws at most two.
SLOTS = 2


@dataclass(frozen=True)
class JudgeConfig:
    # Widths of the per-frame CNN at 32, 16 and 8 pixels.
    widths: tuple[int, int, int] = (24, 48, 64)
    # Width of the per-frame vector that keeps where things are (flattened 8×8 map).
    track_width: int = 128
    # Width of the temporal features fed to the heads.
    hidden: int = 128
    groups: int = 8


def _norm(width: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, width)


class ShapesJudge(nn.Module):
    """Video (B, 3, JUDGE_FRAMES, JUDGE_SIDE, JUDGE_SIDE) in [-1, 1] → logits per head.

    A per-frame CNN gives an 8×8 feature map. Two paths read it: appearance (the map
    averaged over space and time: colour, shape, background) and tracking (the map flattened,
    so position survives, then 1D convolutions over time: motion and the pairing of objects).
    """

    def __init__(self, cfg: JudgeConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or JudgeConfig()
        w1, w2, w3 = cfg.widths
        g = cfg.groups
        self.frame_cnn = nn.Sequential(
            nn.Conv2d(3, w1, 3, padding=1),
            _norm(w1, g),
            nn.SiLU(),
            nn.Conv2d(w1, w2, 3, stride=2, padding=1),
            _norm(w2, g),
            nn.SiLU(),
            nn.Conv2d(w2, w2, 3, padding=1),
            _norm(w2, g),
            nn.SiLU(),
            nn.Conv2d(w2, w3, 3, stride=2, padding=1),
            _norm(w3, g),
            nn.SiLU(),
            nn.Conv2d(w3, w3, 3, padding=1),
            _norm(w3, g),
            nn.SiLU(),
        )
        side = JUDGE_SIDE // 4
        self.track_in = nn.Sequential(
            nn.Conv2d(w3, 16, 1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(16 * side * side, cfg.track_width),
        )
        self.temporal = nn.Sequential(
            nn.Conv1d(cfg.track_width + 2 * w3, cfg.hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv1d(cfg.hidden, cfg.hidden, 3, padding=1),
            nn.SiLU(),
        )
        features = 2 * cfg.hidden + 2 * w3
        heads = {"background": len(BACKGROUNDS), "num_objects": len(OBJECT_COUNTS)}
        for slot in range(SLOTS):
            for attribute, names in OBJECT_HEADS.items():
                heads[f"{attribute}{_suffix(slot)}"] = len(names)
        self.heads = nn.ModuleDict({k: nn.Linear(features, n) for k, n in heads.items()})

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(video)
        return {k: head(features) for k, head in self.heads.items()}

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """The pooled appearance and tracking features the heads read, (B, 2*hidden + 2*w3):
        the feature space of the Fréchet and kernel distances (chaid_lab.fidelity)."""
        b, _, f, h, w = video.shape
        x = video.transpose(1, 2).reshape(b * f, 3, h, w)
        maps = self.frame_cnn(x)  # (B*F, w3, 8, 8)
        # Mean and max over space: the mean reads the background, the max a small object.
        pooled = torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1)  # (B*F, 2*w3)
        track = torch.cat([self.track_in(maps), pooled], dim=1)  # (B*F, track + 2*w3)
        track = self.temporal(track.view(b, f, -1).transpose(1, 2))  # (B, hidden, F)
        return torch.cat(
            [track.mean(dim=2), track.amax(dim=2), pooled.view(b, f, -1).mean(dim=1)], dim=1
        )  # (B, 2*hidden + 2*w3)


def _suffix(slot: int) -> str:
    return "" if slot == 0 else f"_{slot + 1}"


def prepare(video: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Frames → the judge's input (B, 3, JUDGE_FRAMES, JUDGE_SIDE, JUDGE_SIDE) in [-1, 1].

    Accepts uint8 frames (F, H, W, 3) or (B, F, H, W, 3), or float video (B, 3, F, H, W)
    already in [-1, 1]. Frames are picked evenly over the clip; space is area-averaged.
    """
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.shape[-1] != 3 or video.ndim not in (4, 5):
            raise ValueError(f"expected uint8 frames (F, H, W, 3), got {video.dtype} {video.shape}")
        x = torch.from_numpy(video if video.ndim == 5 else video[None])
        x = x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    else:
        x = video.float()
    b, _, f, h, w = x.shape
    index = torch.linspace(0, f - 1, JUDGE_FRAMES).round().long()
    x = x[:, :, index].transpose(1, 2).reshape(b * JUDGE_FRAMES, 3, h, w)
    x = F.interpolate(
        x, size=(JUDGE_SIDE, JUDGE_SIDE), mode="area" if h >= JUDGE_SIDE else "bilinear"
    )
    return x.view(b, JUDGE_FRAMES, 3, JUDGE_SIDE, JUDGE_SIDE).transpose(1, 2)


# One loaded judge per weights file and process.
_JUDGES: dict[str, ShapesJudge] = {}
_JUDGES_LOCK = threading.Lock()


def load_judge(path: str | Path | None = None) -> ShapesJudge:
    """The trained judge on the CPU in fp32, eval mode; loaded once per path and process.

    Raises WeightsError if the file is missing or does not match the architecture.
    """
    from chaid.models.weights import load_weights

    key = str(path or JUDGE_WEIGHTS)
    with _JUDGES_LOCK:
        if key not in _JUDGES:
            with torch.device("meta"):
                judge = ShapesJudge()
            load_weights(judge, key, device="cpu", dtype=torch.float32)
            _JUDGES[key] = judge.eval().requires_grad_(False)
        return _JUDGES[key]


@torch.no_grad()
def predict(video: np.ndarray | torch.Tensor, judge: ShapesJudge | None = None) -> dict:
    """Per-head probabilities (numpy arrays, one row per video) for frames as :func:`prepare`
    accepts them."""
    judge = judge or load_judge()
    logits = judge(prepare(video))
    return {k: v.softmax(dim=-1).numpy() for k, v in logits.items()}


def _object_probability(
    probs: dict[str, np.ndarray], slot: int, named: dict[str, int]
) -> dict[str, float]:
    return {a: float(probs[f"{a}{_suffix(slot)}"][0, v]) for a, v in named.items()}


def score(video: np.ndarray, prompt: str, judge: ShapesJudge | None = None) -> dict:
    """How well a video shows what a prompt names.

    Args:
        video: uint8 frames (F, H, W, 3), any frame count and size.
        prompt: English in the Shapes grammar (or close to it).
        judge: a loaded judge (default: the shipped one).

    Returns a dict:
        ``attributes``: named attribute → probability of the named value. Keys are
        ``background``, ``num_objects`` (when the prompt names any object attribute), and
        ``shape``/``colour``/``motion`` of the first named object, ``_2``-suffixed for the
        second; a prompt naming more than two objects is scored on its first two.
        ``overall``: the mean of ``attributes`` in [0, 1] (1.0 when nothing is named).
        ``predicted``: the judge's most likely value of each head, as names.
    Predicted object slots are matched to the prompt's objects by whichever pairing gives
    the higher mean probability; the second slot counts only as much as the judge believes
    there are two objects.
    """
    probs = predict(video, judge)
    parsed = parse(prompt)
    attributes: dict[str, float] = {}
    if parsed.background is not None:
        attributes["background"] = float(
            probs["background"][0, BACKGROUNDS.index(parsed.background)]
        )
    objects = []
    for obj in parsed.objects[:SLOTS]:
        named = {
            a: names.index(getattr(obj, a))
            for a, names in OBJECT_HEADS.items()
            if getattr(obj, a) is not None
        }
        if named:
            objects.append(named)
    if objects:
        count = OBJECT_COUNTS.index(len(objects))
        attributes["num_objects"] = float(probs["num_objects"][0, count])
        p_two = float(probs["num_objects"][0, OBJECT_COUNTS.index(2)])
        best: list[dict[str, float]] | None = None
        best_mean = -1.0
        for slots in itertools.permutations(range(SLOTS), len(objects)):
            found = []
            for slot, named in zip(slots, objects, strict=True):
                p = _object_probability(probs, slot, named)
                found.append({a: v * (p_two if slot > 0 else 1.0) for a, v in p.items()})
            mean = float(np.mean([v for f in found for v in f.values()]))
            if mean > best_mean:
                best, best_mean = found, mean
        assert best is not None
        for index, found in enumerate(best):
            attributes.update({f"{a}{_suffix(index)}": v for a, v in found.items()})
    predicted: dict[str, str | int] = {
        "background": BACKGROUNDS[int(probs["background"][0].argmax())],
        "num_objects": OBJECT_COUNTS[int(probs["num_objects"][0].argmax())],
    }
    for slot in range(SLOTS):
        for a, names in OBJECT_HEADS.items():
            key = f"{a}{_suffix(slot)}"
            predicted[key] = names[int(probs[key][0].argmax())]
    overall = float(np.mean(list(attributes.values()))) if attributes else 1.0
    return {"overall": overall, "attributes": attributes, "predicted": predicted}
