"""``chaid-lab shapes defects``: the visible defects of a Shapes model, counted on seeds.

Three defects a viewer of the tiny-shapes videos notices, each with the metric that
catches it, measured on fixed prompts over ``seeds`` seeds and on the true renders of the
same prompts (which must show none of them: a check that flags the truth is miscalibrated)
and on their VAE round trips (the sharpest video a generator decoding with that VAE can
give):

* ``jump``: an object that teleports or splits at its bounce. The largest frame-to-frame
  move of the clip's largest moving blob (:func:`chaid_lab.fidelity.largest_blob_jump`);
  the world's bounce is a continuous fold, a few pixels a frame. Flagged above
  :data:`VISIBLE_JUMP_PX`. (The luma spike of the step curve,
  :func:`chaid_lab.fidelity.spike`, is kept in the readings: it sees a jump on a dark
  background but not on a textured one, where the mean change hides it.)
* ``extra_object``: a second object drawn for a one-object prompt. The judge's probability
  of two objects; flagged above 0.5.
* ``shape_change``: an object of a two-object prompt whose shape changes during the clip.
  Each half of the clip (frames 0-7 and 8-15 of 16) is judged on its own against the
  prompt; flagged when the judge reads a named shape confidently in one half
  (:data:`SHAPE_HELD`) and not in the other (:data:`SHAPE_LOST`).

The rate of each defect is the share of (prompt, seed) videos flagged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# A blob move (pixels in one frame, at 64x64) above which a jump is visible: three times
# the world's fastest bounce.
VISIBLE_JUMP_PX = 20.0
DEFAULT_SEEDS = 10
# A shape changes when the judge reads it confidently in one half of the clip (above
# SHAPE_HELD) and not in the other (below SHAPE_LOST); between the two lines the reading is
# the judge's uncertainty about a blurred small object, which VAE round trips show too.
SHAPE_HELD = 0.7
SHAPE_LOST = 0.3
# The temporal guidance (sampler.temporal_guidance) the report also measures: the scale
# that stops most shape changes under the ODE with the suite's judge tied (docs/shapes.md).
TEMPORAL_GUIDANCE = 0.5

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
    jump: float  # the luma spike (fidelity.spike)
    blob_jump: float  # pixels (fidelity.largest_blob_jump)
    p_two: float
    # per named object: the judge's probability of its shape in each half of the clip
    shape_halves: tuple[tuple[float, float], ...]


def measure(video: np.ndarray, prompt: str, judge: Any) -> Flags:
    """The three defect readings of one video (F, H, W, 3) uint8."""
    from chaid_lab.fidelity import largest_blob_jump, spike
    from chaid_lab.shapes.judge import score

    attributes = score(video, prompt, judge)["attributes"]
    half = video.shape[0] // 2
    first, second = (score(part, prompt, judge)["attributes"]
                     for part in (video[:half], video[half:]))
    shapes = tuple((round(first[key], 3), round(second[key], 3))
                   for key in ("shape", "shape_2") if key in first and key in second)
    # num_objects is the probability of the count the prompt names
    p_named = attributes.get("num_objects", 1.0)
    p_two = p_named if "shape_2" in attributes else 1.0 - p_named
    return Flags(round(spike(video), 4), round(largest_blob_jump(video), 1),
                 round(float(p_two), 3), shapes)


def flagged(check: str, flags: Flags) -> bool:
    if check == "jump":
        return flags.blob_jump > VISIBLE_JUMP_PX
    if check == "extra_object":
        return flags.p_two > 0.5
    if check == "shape_change":
        return any(min(a, b) < SHAPE_LOST and max(a, b) > SHAPE_HELD
                   for a, b in flags.shape_halves)
    raise ValueError(f"unknown check {check!r}")


def round_trip(pipeline: Any, video: np.ndarray) -> np.ndarray:
    """A true render through the model's VAE and back: the best a generator decoding with
    that VAE can show (what the checks read of it is their floor on generated videos)."""
    import torch

    from chaid_lab.shapes.data import to_tensor, to_uint8

    vae = pipeline.parts.vae
    with torch.no_grad():
        x = to_tensor(video)[None].to(pipeline.device)
        return to_uint8(vae.decode(vae.encode(x), video.shape[0])[0])


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
    report: dict[str, Any] = {"seeds": seeds, "steps": steps, "checks": {},
                              "sampler": pipeline.sampler}
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
                rec = measure(round_trip(pipeline, truth), prompt, judge)
                rows.append({"prompt": prompt, "seed": seed,
                             "model": flagged(check, model), "truth": flagged(check, true),
                             "vae": flagged(check, rec),
                             "readings": {"model": asdict(model), "vae": asdict(rec)}})
            log.info("%s: %r done (%.0f s)", check, prompt, time.perf_counter() - t0)
        by_prompt = {p: sum(r["model"] for r in rows if r["prompt"] == p)
                     for p in PROMPTS[check]}
        report["checks"][check] = {
            "videos": len(rows),
            "rate": sum(r["model"] for r in rows) / len(rows),
            "truth_rate": sum(r["truth"] for r in rows) / len(rows),
            "vae_rate": sum(r["vae"] for r in rows) / len(rows),
            "flagged_by_prompt": by_prompt,
            "flagged_seeds": sorted({r["seed"] for r in rows if r["model"]}),
            "rows": rows,
        }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table; each of its ``variants`` (the same checks under
    another sampler: ``label``, ``checks``) adds a column."""
    variants = report.get("variants", [])
    sampler = report.get("sampler")
    how = (f", eta {sampler['eta']:g} while t > {sampler['eta_until']:g}"
           if sampler and sampler["eta"] else "")
    extra = "".join(f" model, {v['label']} |" for v in variants)
    lines = [f"Visible defects, {report['seeds']} seeds per prompt, {report['steps']} steps{how}",
             "", "| check | videos | flagged: model | true renders | their VAE round trips |"
             f" model, per prompt |{extra}", "|---|---|---|---|---|---|" + "---|" * len(variants)]
    for check, r in report["checks"].items():
        per = ", ".join(str(n) for n in r["flagged_by_prompt"].values())
        row = (f"| {check} | {r['videos']} | {r['rate']:.0%} | {r['truth_rate']:.0%} |"
               f" {r['vae_rate']:.0%} | {per} |")
        row += "".join(f" {v['checks'][check]['rate']:.0%} |" for v in variants)
        lines.append(row)
    return "\n".join(lines)
