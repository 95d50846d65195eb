"""The Shapes evaluation suite: fixed prompts, judged at several step counts.

The suite is a pure function of its seed: ``SUITE_SIZE`` scenes, one in every
``HELD_OUT_EVERY`` built around a held-out attribute combination (lab/chaid_lab/shapes/heldout.py,
which the DiT never sees in training), the rest drawn from the training distribution but
never from its scene stream. Each item carries one natural phrasing of its scene (the
grammar's synonyms and templates) and its own noise seed.

:func:`evaluate_steps` generates every item at each requested step count with the same
seed and scores it with the judge; the report gives mean judge scores per step count for
the whole suite, the in-distribution items and the held-out ones, with per-attribute means
and median latencies, plus two references per group that bound what a generator can reach:
the judge on the exact renders and on their round trip through the VAE.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from chaid.config import MODEL_CFG_SCALE
from chaid.engine.pipeline import GenerationRequest, Pipeline
from chaid_lab.shapes.data import to_tensor, to_uint8
from chaid_lab.shapes.heldout import (
    HELD_OUT_COLOUR_BACKGROUNDS,
    HELD_OUT_OBJECTS,
    TRAINING_DISTRIBUTION,
    is_held_out,
)
from chaid_lab.shapes.judge import ShapesJudge, load_judge, score
from chaid_lab.shapes.prompts import describe
from chaid_lab.shapes.world import BACKGROUNDS, MOTIONS, SHAPES, Scene, render, sample_scene

log = logging.getLogger(__name__)

SUITE_SEED = 20261
SUITE_SIZE = 240
# Every sixth item is held out: 40 of 240, ten per held-out combination.
HELD_OUT_EVERY = 6
DEFAULT_STEPS = (1, 2, 4, 8, 16, 30)
GROUPS = ("all", "in-distribution", "held-out")
# Attributes averaged over objects in the report (``shape`` covers ``shape_2`` too).
ATTRIBUTES = ("background", "num_objects", "shape", "colour", "motion")


@dataclass(frozen=True)
class SuiteItem:
    index: int
    prompt: str
    scene: Scene
    # The noise seed of every generation of this item.
    seed: int
    # None, or the held-out combination the scene contains, e.g. "purple triangle".
    held_out: str | None

    @property
    def group(self) -> str:
        return "held-out" if self.held_out else "in-distribution"


def _held_out_combinations() -> list[tuple[str, dict]]:
    """(label, sample_scene arguments except objects' free parts) per held-out pair."""
    combos: list[tuple[str, dict]] = []
    for shape, colour in sorted(HELD_OUT_OBJECTS):
        combos.append((f"{colour} {shape}", {"shape": shape, "colour": colour}))
    for colour, background in sorted(HELD_OUT_COLOUR_BACKGROUNDS):
        combos.append((f"{colour} over {background}", {"colour": colour, "background": background}))
    return combos


def _held_out_scene(rng: np.random.Generator, fixed: dict) -> Scene:
    shape = fixed.get("shape") or str(rng.choice(SHAPES))
    colour = fixed["colour"]
    background = fixed.get("background") or str(rng.choice(BACKGROUNDS))
    motion = str(rng.choice(MOTIONS))
    scene = sample_scene(rng, background=background, objects=[(shape, colour, motion)])
    assert is_held_out(scene)
    return scene


def evaluation_suite(size: int = SUITE_SIZE, seed: int = SUITE_SEED) -> list[SuiteItem]:
    """The fixed suite: the same ``size`` and ``seed`` always give the same items."""
    if size < 1:
        raise ValueError("the suite needs at least one item")
    rng = np.random.default_rng(seed)
    combos = _held_out_combinations()
    items = []
    for index in range(size):
        if index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1:
            label, fixed = combos[(index // HELD_OUT_EVERY) % len(combos)]
            scene = _held_out_scene(rng, fixed)
        else:
            label, scene = None, sample_scene(rng, TRAINING_DISTRIBUTION)
        items.append(SuiteItem(index, describe(scene, rng), scene, 10_000 + index, label))
    return items


def _attribute_means(scores: Sequence[dict]) -> dict[str, float]:
    """Mean probability per attribute, pooling the second object into its attribute."""
    pooled: dict[str, list[float]] = {a: [] for a in ATTRIBUTES}
    for s in scores:
        for key, p in s["attributes"].items():
            pooled[key.removesuffix("_2")].append(p)
    return {a: float(np.mean(v)) for a, v in pooled.items() if v}


def _summary(rows: list[dict], key: str, group: str) -> dict:
    chosen = [r for r in rows if group == "all" or r["group"] == group]
    scores = [r[key] for r in chosen]
    out = {
        "group": group,
        "items": len(chosen),
        "judge": float(np.mean([s["overall"] for s in scores])),
        "attributes": _attribute_means(scores),
    }
    latencies = [s["latency_ms"] for s in scores if "latency_ms" in s]
    if latencies:
        out["latency_ms_median"] = statistics.median(latencies)
    return out


@torch.no_grad()
def _vae_round_trip(pipeline: Pipeline, video: np.ndarray) -> np.ndarray:
    vae = pipeline.parts.vae
    z = vae.encode(to_tensor(video)[None].to(pipeline.device))
    return to_uint8(vae.decode(z, video.shape[0])[0])


def evaluate_steps(
    pipeline: Pipeline,
    items: Sequence[SuiteItem],
    steps: Sequence[int] = DEFAULT_STEPS,
    *,
    judge: ShapesJudge | None = None,
    keep_videos: Sequence[int] = (),
    cfg_scale: float | str | None = MODEL_CFG_SCALE,
) -> dict:
    """Generate every item at every step count and judge it against its prompt.

    Returns a JSON-able report: ``steps``, ``results`` (one summary per step count and
    group), ``references`` (renders and VAE round trips per group), ``rows`` (per item:
    prompt, group and per step count the overall score, attributes and latency) and
    ``videos`` (item index → {"render" or step count: frames}) for ``keep_videos``, which
    the report's JSON form leaves out. ``cfg_scale`` is the guidance of every run (default:
    the model's); the report records the value used.
    """
    if not steps:
        raise ValueError("give at least one step count")
    judge = judge or load_judge()
    spec = pipeline.parts.spec
    # the model's scale when cfg_scale says so; an invalid one fails before any work
    scale = pipeline.resolve(GenerationRequest("x", cfg_scale=cfg_scale)).cfg_scale
    keep = set(keep_videos)
    rows, videos = [], {}
    start = time.perf_counter()
    for n, item in enumerate(items):
        row: dict = {"index": item.index, "prompt": item.prompt, "group": item.group}
        if item.held_out:
            row["held_out"] = item.held_out
        truth = render(item.scene, spec.frames, spec.height, spec.width)
        row["render"] = score(truth, item.prompt, judge)
        row["vae"] = score(_vae_round_trip(pipeline, truth), item.prompt, judge)
        kept = {"render": truth} if item.index in keep else None
        for k in steps:
            request = GenerationRequest(item.prompt, steps=k, seed=item.seed, cfg_scale=scale)
            result = pipeline.generate(request)
            judged = score(result.video, item.prompt, judge)
            row[str(k)] = {
                "overall": judged["overall"],
                "attributes": judged["attributes"],
                "latency_ms": result.timings.total_ms,
            }
            if kept is not None:
                kept[k] = result.video
        if kept is not None:
            videos[item.index] = kept
        rows.append(row)
        if (n + 1) % 10 == 0 or n + 1 == len(items):
            elapsed = time.perf_counter() - start
            log.info(
                "suite: %d/%d items (%.0f s, %.0f s left)",
                n + 1,
                len(items),
                elapsed,
                elapsed / (n + 1) * (len(items) - n - 1),
            )
    groups = [g for g in GROUPS if g == "all" or any(r["group"] == g for r in rows)]
    results = [{"steps": k, **_summary(rows, str(k), g)} for k in steps for g in groups]
    references = {
        ref: [_summary(rows, ref, g) for g in groups] for ref in ("render", "vae")
    }
    for row in rows:  # keep the per-item rows small: overall scores only for references
        row["render"] = row["render"]["overall"]
        row["vae"] = row["vae"]["overall"]
    return {
        "suite": {
            "seed": SUITE_SEED,
            "items": len(rows),
            "held_out": sum(r["group"] == "held-out" for r in rows),
        },
        "steps": list(steps),
        "cfg_scale": scale,
        "results": results,
        "references": references,
        "rows": rows,
        "videos": videos,
    }


def format_table(report: dict) -> str:
    """The judge-vs-steps table, one line per step count and group."""
    lines = [
        f"{'steps':>5}  {'group':<16}{'judge':>7}{'bg':>7}{'shape':>7}{'colour':>7}"
        f"{'motion':>7}{'median ms':>11}"
    ]

    def line(label: str, s: dict) -> str:
        a = s["attributes"]
        ms = f"{s['latency_ms_median']:>11.0f}" if "latency_ms_median" in s else " " * 11
        return (
            f"{label:>5}  {s['group']:<16}{s['judge']:>7.3f}{a.get('background', 0):>7.3f}"
            f"{a.get('shape', 0):>7.3f}{a.get('colour', 0):>7.3f}{a.get('motion', 0):>7.3f}{ms}"
        )

    for s in report["results"]:
        lines.append(line(str(s["steps"]), s))
    for ref, summaries in report["references"].items():
        for s in summaries:
            lines.append(line(ref, s))
    return "\n".join(lines)


PAIRED_ATTRIBUTES = ("num_objects", "shape", "colour", "motion")


def paired_against(report: dict, base: dict) -> dict:
    """``report`` against ``base`` (two evaluations of the same suite items, e.g. a sampler
    option on and off), item by item: per step count both ran, the paired mean difference
    of the judge score and of each attribute with its 95% bootstrap interval
    (:func:`chaid_lab.stats.paired_difference`). ValueError when they share no item."""
    from chaid_lab.stats import paired_difference

    ours = {row["index"]: row for row in report["rows"]}
    theirs = {row["index"]: row for row in base["rows"]}
    shared = sorted(ours.keys() & theirs.keys())
    if not shared:
        raise ValueError("the two evaluations share no suite item")
    out: dict = {"items": len(shared), "steps": {}}
    for steps in sorted(set(report["steps"]) & set(base["steps"])):
        key = str(steps)
        a = [ours[i][key] for i in shared]
        b = [theirs[i][key] for i in shared]
        diffs = {"judge": paired_difference([r["overall"] for r in a],
                                            [r["overall"] for r in b]).as_dict()}
        for name in PAIRED_ATTRIBUTES:
            diffs[name] = paired_difference(
                [r["attributes"].get(name, np.nan) for r in a],
                [r["attributes"].get(name, np.nan) for r in b]).as_dict()
        out["steps"][key] = diffs
    return out


def format_against(paired: dict) -> str:
    """:func:`paired_against` as lines: per step count, each metric's difference."""
    from chaid_lab.stats import format_diff

    lines = [f"paired against the base evaluation ({paired['items']} items, this minus base):"]
    for steps, diffs in paired["steps"].items():
        lines.append(f"{steps:>5} steps  judge {format_diff(diffs['judge'])}")
        lines.extend(f"{'':>13}{name} {format_diff(d)}" for name, d in diffs.items()
                     if name != "judge")
    return "\n".join(lines)


def _require_matplotlib():
    try:
        import matplotlib
    except ModuleNotFoundError:
        from chaid.errors import ChaidError

        raise ChaidError(
            "plots need matplotlib: pip install matplotlib"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(report: dict, path) -> None:
    """Judge score against step count (log scale), per group, with the VAE ceiling."""
    plt = _require_matplotlib()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    colours = {"all": "tab:blue", "in-distribution": "tab:green", "held-out": "tab:orange"}
    for group, colour in colours.items():
        pts = [(s["steps"], s["judge"]) for s in report["results"] if s["group"] == group]
        if not pts:
            continue
        ax.plot(*zip(*pts, strict=True), marker="o", color=colour, label=group)
        motion = [
            (s["steps"], s["attributes"].get("motion"))
            for s in report["results"]
            if s["group"] == group and "motion" in s["attributes"]
        ]
        if group == "all" and motion:
            ax.plot(*zip(*motion, strict=True), "--", color="tab:purple", label="motion (all)")
    vae = next(s for s in report["references"]["vae"] if s["group"] == "all")
    ax.axhline(vae["judge"], color="grey", ls=":", label="VAE round trip of renders")
    ax.set_xscale("log")
    ax.set_xticks(report["steps"], [str(k) for k in report["steps"]])
    ax.set_xlabel("denoising steps")
    ax.set_ylabel("judge score (mean overall)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"tiny-shapes on the Shapes suite ({report['suite']['items']} prompts)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def contact_sheet(report: dict, path, frames_shown: int = 6) -> None:
    """Kept videos as a grid: per item, one strip of frames per render / step count."""
    plt = _require_matplotlib()
    videos = report["videos"]
    if not videos:
        raise ValueError("the report kept no videos")
    prompts = {r["index"]: r["prompt"] for r in report["rows"]}
    labels = ["render", *report["steps"]]
    n_rows = len(videos) * len(labels)
    first = next(iter(videos.values()))["render"]
    _, h, w, _ = first.shape
    aspect = frames_shown * (w + 2) / (h + 2)
    fig, axes = plt.subplots(
        n_rows, 1, figsize=(1.0 * aspect + 0.8, n_rows * 1.0 + len(videos) * 0.25), dpi=100,
        squeeze=False,
    )
    for b, (index, kept) in enumerate(sorted(videos.items())):
        for r, label in enumerate(labels):
            video = kept[label]
            picks = np.linspace(0, len(video) - 1, frames_shown).round().astype(int)
            strip = np.full((h + 2, frames_shown * (w + 2), 3), 255, dtype=np.uint8)
            for c, f in enumerate(picks):
                strip[1 : h + 1, c * (w + 2) + 1 : c * (w + 2) + w + 1] = video[f]
            ax = axes[b * len(labels) + r, 0]
            ax.imshow(strip, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            ax.set_ylabel("render" if label == "render" else f"{label} steps", fontsize=8,
                          rotation=0, ha="right", va="center")
            if r == 0:
                ax.set_title(prompts[index], fontsize=8, loc="left")
    fig.tight_layout(h_pad=0.1)
    fig.savefig(path)
    plt.close(fig)
