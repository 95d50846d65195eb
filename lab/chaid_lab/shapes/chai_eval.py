"""CHAI on the Shapes world: does an 8-step run steered by a partner's cache match 30 steps?

For pairs of prompts that share an entity (the same scene, or the same object over another
scene), the first prompt runs in full mode and fills a cache entry; the second is then
generated three ways from the same seed: full-30 (the quality target), plain-8 (the
speed target) and CHAI-8 (8 steps with Cache Attention on the partner's entry). The judge
scores each video against the second prompt; latencies are measured in the same process,
one after another, on the same machine.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

import numpy as np

from chaid.engine.pipeline import GenerationRequest, Pipeline
from chaid_lab.shapes.judge import load_judge, score
from chaid_lab.shapes.prompts import describe
from chaid_lab.shapes.world import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, Scene, sample_scene

log = logging.getLogger(__name__)

METHODS = ("full-30", "plain-8", "chai-8")


@dataclass(frozen=True)
class Pair:
    cached: str  # the prompt whose full run fills the cache
    prompt: str  # the prompt generated three ways
    shared: str  # "scene" or "object"
    # The scene ``prompt`` describes: its true render is the fidelity metrics' reference.
    scene: Scene | None = None


def entity_sharing_pairs(count: int, seed: int = 0) -> list[Pair]:
    """Pairs alternating between a shared scene and a shared object (shape and colour)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(count):
        a = sample_scene(rng)
        main = a.objects[0]
        if i % 2 == 0:  # same background, another object
            shape = rng.choice([s for s in SHAPES if s != main.shape])
            colour = rng.choice([c for c in COLOURS if c != main.colour])
            motion = str(rng.choice(MOTIONS))
            b = sample_scene(
                rng, background=a.background, objects=[(str(shape), str(colour), motion)]
            )
            shared = "scene"
        else:  # same object, another background
            others = [bg for bg in BACKGROUNDS if bg != a.background]
            motion = str(rng.choice(MOTIONS))
            b = sample_scene(
                rng, background=str(rng.choice(others)), objects=[(main.shape, main.colour, motion)]
            )
            shared = "object"
        pairs.append(Pair(describe(a, rng), describe(b, rng), shared, b))
    return pairs


def evaluate(pipeline: Pipeline, pairs: list[Pair], seed: int = 0) -> dict:
    """Run every pair; returns per-method median latency, mean judge score and per-pair rows."""
    judge = load_judge()
    chai = pipeline.chai
    rows = []
    for i, pair in enumerate(pairs):
        entry = pipeline.full(pair.cached, seed=seed + 2 * i)
        runs = {
            "full-30": GenerationRequest(pair.prompt, steps=chai.full_steps, seed=seed + 2 * i + 1),
            "plain-8": GenerationRequest(pair.prompt, steps=chai.fast_steps, seed=seed + 2 * i + 1),
            "chai-8": GenerationRequest(
                pair.prompt,
                steps=chai.fast_steps,
                seed=seed + 2 * i + 1,
                cache_latents=entry.captured,
            ),
        }
        row = {"cached": pair.cached, "prompt": pair.prompt, "shared": pair.shared}
        for name, request in runs.items():
            result = pipeline.generate(request)
            row[name] = {
                "judge": score(result.video, pair.prompt, judge)["overall"],
                "latency_ms": result.timings.total_ms,
            }
        rows.append(row)
        log.info(
            "pair %d/%d: %s",
            i + 1,
            len(pairs),
            "  ".join(f"{m} {row[m]['judge']:.2f}" for m in METHODS),
        )
    full_latency = statistics.median(r["full-30"]["latency_ms"] for r in rows)
    summary = {}
    for m in METHODS:
        latency = statistics.median(r[m]["latency_ms"] for r in rows)
        summary[m] = {
            "judge": float(np.mean([r[m]["judge"] for r in rows])),
            "latency_ms_median": latency,
            "speedup_vs_full": full_latency / latency,
        }
    return {"pairs": len(rows), "methods": summary, "rows": rows}


def format_table(report: dict) -> str:
    lines = [f"{'method':<10}{'judge':>8}{'median ms':>12}{'speedup':>9}"]
    for m, s in report["methods"].items():
        lines.append(
            f"{m:<10}{s['judge']:>8.3f}{s['latency_ms_median']:>12.1f}{s['speedup_vs_full']:>8.2f}x"
        )
    return "\n".join(lines)
