"""``chaid-lab shapes defects``: the visible defects of a Shapes model, counted on seeds.

Three defects a viewer of the tiny-shapes videos notices, each with the metric that
catches it, measured on fixed prompts over ``seeds`` seeds and on the true renders of the
same prompts (which must show none of them: a check that flags the truth is miscalibrated):

* ``jump``: an object that teleports at its bounce. The clip's largest frame-to-frame luma
  change above its median change (:func:`chaid_lab.fidelity.spike`); the world's bounce is
  a continuous fold, so a true render stays near 0. Flagged above :data:`VISIBLE_JUMP`.
* ``extra_object``: a second object drawn for a one-object prompt. The judge's probability
  of two objects; flagged above 0.5.
* ``shape_change``: an object of a two-object prompt whose shape changes during the clip.
  Each half of the clip (frames 0-7 and 8-15 of 16) is judged on its own against the
  prompt; flagged when a named shape is the judge's reading (probability ≥ 0.5) in one half
  and not in the other.

The rate of each defect is the share of (prompt, seed) videos flagged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# A clip's spike above which a jump is visible: about 6% of full scale mean luma change in
# one frame, ten times the largest true render's (docs/results.md, the step curve).
VISIBLE_JUMP = 0.02
DEFAULT_SEEDS = 10

# The prompts of each check. The one-object prompts include the two a first look at seed 0
# showed with a second object.
PROMPTS: dict[str, tuple[str, ...]] = {
    "jump": (
        "a blue square bouncing around over the ocean",
        "a red circle bouncing off the edges across a grassy field",
        "a yellow triangle ricocheting around in the night sky",
        "a white circle bouncing from wall to wall over the desert",
    ),
    "extra_object": (
        "a red circle moving to the left over a grassy field",
        "a yellow triangle sliding right across the desert",
        "a purple square moving up in the night sky",
        "a green circle drifting down over a snowy field",
    ),
    "shape_change": (
        "a red square moving left and a blue circle moving right over a grassy field",
        "a yellow circle moving up and a green triangle moving down over the ocean",
        "a white triangle moving right and an orange square bouncing around in the night sky",
        "a purple circle moving left and a red triangle moving up across the desert",
    ),
}


@dataclass(frozen=True)
class Flags:
    jump: float
    p_two: float
    # per named object: whether its shape is the judge's reading in each half
    shape_halves: tuple[tuple[bool, bool], ...]


def measure(video: np.ndarray, prompt: str, judge: Any) -> Flags:
    """The three defect readings of one video (F, H, W, 3) uint8."""
    from chaid_lab.fidelity import spike
    from chaid_lab.shapes.judge import score

    attributes = score(video, prompt, judge)["attributes"]
    half = video.shape[0] // 2
    first, second = (score(part, prompt, judge)["attributes"]
                     for part in (video[:half], video[half:]))
    shapes = tuple((first[key] >= 0.5, second[key] >= 0.5)
                   for key in ("shape", "shape_2") if key in first and key in second)
    # num_objects is the probability of the count the prompt names
    p_named = attributes.get("num_objects", 1.0)
    p_two = p_named if "shape_2" in attributes else 1.0 - p_named
    return Flags(spike(video), float(p_two), shapes)


def flagged(check: str, flags: Flags) -> bool:
    if check == "jump":
        return flags.jump > VISIBLE_JUMP
    if check == "extra_object":
        return flags.p_two > 0.5
    if check == "shape_change":
        return any(a != b for a, b in flags.shape_halves)
    raise ValueError(f"unknown check {check!r}")


def run(pipeline: Any, seeds: int = DEFAULT_SEEDS, steps: int | None = None,
        cfg_scale: float | str | None = None, checks: tuple[str, ...] = tuple(PROMPTS)
        ) -> dict[str, Any]:
    """Generate every check's prompts at ``seeds`` seeds (``steps``: the preset's full
    steps) and read the defects; the true renders of the same prompts are read alongside."""
    from chaid.config import MODEL_CFG_SCALE
    from chaid.engine.pipeline import GenerationRequest
    from chaid_lab.shapes.judge import load_judge
    from chaid_lab.shapes.prompts import scene_for_prompt
    from chaid_lab.shapes.world import render

    judge = load_judge()
    steps = steps or pipeline.chai.full_steps
    scale = MODEL_CFG_SCALE if cfg_scale is None else cfg_scale
    report: dict[str, Any] = {"seeds": seeds, "steps": steps, "checks": {}}
    t0 = time.perf_counter()
    for check in checks:
        rows = []
        for prompt in PROMPTS[check]:
            for seed in range(seeds):
                req = pipeline.resolve(GenerationRequest(prompt, seed=seed, steps=steps,
                                                         cfg_scale=scale))
                video = pipeline.generate(req).video
                scene = scene_for_prompt(prompt, np.random.default_rng(seed))
                truth = render(scene, req.frames, req.height, req.width)
                model, true = measure(video, prompt, judge), measure(truth, prompt, judge)
                rows.append({"prompt": prompt, "seed": seed,
                             "model": flagged(check, model), "truth": flagged(check, true),
                             "jump": round(model.jump, 4), "p_two": round(model.p_two, 3),
                             "shape_halves": [list(h) for h in model.shape_halves]})
            log.info("%s: %r done (%.0f s)", check, prompt, time.perf_counter() - t0)
        by_prompt = {p: sum(r["model"] for r in rows if r["prompt"] == p)
                     for p in PROMPTS[check]}
        report["checks"][check] = {
            "videos": len(rows),
            "rate": sum(r["model"] for r in rows) / len(rows),
            "truth_rate": sum(r["truth"] for r in rows) / len(rows),
            "flagged_by_prompt": by_prompt,
            "flagged_seeds": sorted({r["seed"] for r in rows if r["model"]}),
            "rows": rows,
        }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [f"Visible defects, {report['seeds']} seeds per prompt, {report['steps']} steps",
             "", "| check | videos | flagged (model) | flagged (true renders) | per prompt |",
             "|---|---|---|---|---|"]
    for check, r in report["checks"].items():
        per = ", ".join(str(n) for n in r["flagged_by_prompt"].values())
        lines.append(f"| {check} | {r['videos']} | {r['rate']:.0%} | {r['truth_rate']:.0%} |"
                     f" {per} |")
    return "\n".join(lines)
