"""``chaid-lab bench ablation``: which CHAI settings matter, on all-hit Shapes pairs.

For each entity-sharing pair (:func:`chaid_lab.shapes.chai_eval.entity_sharing_pairs`) the first
prompt runs in full mode and its latents z_2..z_6 are captured; the second prompt is then
generated from one seed by every variant below, each changing one setting of the default
CHAI configuration (8 fast steps, Cache Attention at steps {2,3,4} in spatial block 0, keys
and values from the cache only, latents stored as fp16):

* ``fast_steps``: 4, 6, 8, 12 (each beside a plain run of as many steps);
* ``cache_steps``: {2}, {2,3,4}, {2..6};
* ``cache_blocks``: {0}, {0,1};
* ``kv_source``: cache, cache+current;
* ``stored dtype``: fp32, fp16, int8, the store's three formats (``store.latent_dtype``);
  the latents pass through the same conversion the store applies (int8: symmetric, one
  scale per channel and frame).

Reported per variant: mean judge score against the second prompt, PSNR to the same-seed
full-30 video, median latency (one process, runs interleaved pair by pair), speedup vs
full-30 and bytes per cache entry (latents only); and the paired differences of the judge
(and PSNR) against full-30 and against plain-N at the variant's own N, each with its 95%
bootstrap interval over pairs (win or loss only when the interval excludes 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
from dataclasses import dataclass

import numpy as np
import torch

from chaid.checks import check_int
from chaid.config import ChaiSettings
from chaid.engine.pipeline import GenerationRequest, Pipeline
from chaid_lab.stats import format_diff, paired_difference

log = logging.getLogger(__name__)

STORED_BYTES = {"float32": 4, "float16": 2, "int8": 1}
CAPTURED = (2, 3, 4, 5, 6)


@dataclass(frozen=True)
class Variant:
    knob: str  # which setting the variant changes ("reference" for the baselines)
    value: str
    chai: ChaiSettings | None  # None: a plain run without Cache Attention
    steps: int
    dtype: str = "float16"


def variants(base: ChaiSettings | None = None) -> list[Variant]:
    base = base or ChaiSettings()
    rep = dataclasses.replace
    out = [Variant("reference", "full-30", None, base.full_steps)]
    for n in (4, 6, 8, 12):
        out.append(Variant("reference", f"plain-{n}", None, n))
    for n in (4, 6, 8, 12):
        out.append(Variant("fast_steps", str(n), rep(base, fast_steps=n), n))
    for steps in ((2,), (2, 3, 4), (2, 3, 4, 5, 6)):
        label = "{" + ",".join(map(str, steps)) + "}"
        out.append(Variant("cache_steps", label, rep(base, cache_steps=steps), base.fast_steps))
    for blocks in ((0,), (0, 1)):
        label = "{" + ",".join(map(str, blocks)) + "}"
        out.append(Variant("cache_blocks", label, rep(base, cache_blocks=blocks), base.fast_steps))
    for source in ("cache", "cache+current"):
        out.append(Variant("kv_source", source, rep(base, kv_source=source), base.fast_steps))
    for dtype in ("float32", "float16", "int8"):
        out.append(Variant("stored_dtype", dtype, base, base.fast_steps, dtype))
    return out


def stored_round_trip(z: torch.Tensor, dtype: str) -> torch.Tensor:
    """What a latent (C, T, h, w) reads back as after being stored in ``dtype``."""
    if dtype == "float32":
        return z.float().clone()
    if dtype == "float16":
        return z.half().float()
    if dtype == "int8":  # the store's own format: one scale per channel and frame
        from chaid.store.codec import dequantise_int8, quantise_int8

        packed = quantise_int8(z.float().numpy())
        return torch.from_numpy(dequantise_int8(packed.tobytes(), tuple(z.shape)))
    raise ValueError(f"unknown stored dtype {dtype!r}")


def entry_bytes(variant: Variant, latent_numel: int, channels: int, frames: int) -> int:
    """Bytes of the latents one entry of this variant stores."""
    if variant.chai is None:
        return 0
    per_step = latent_numel * STORED_BYTES[variant.dtype]
    if variant.dtype == "int8":
        per_step += channels * frames * 4  # the fp32 scales
    return per_step * len(variant.chai.cache_steps)


def run_ablation(pipeline: Pipeline, pairs: int, seed: int = 0) -> dict:
    from chaid_lab.fidelity import psnr
    from chaid_lab.shapes.chai_eval import entity_sharing_pairs
    from chaid_lab.shapes.judge import load_judge, score

    judge = load_judge()
    parts, device = pipeline.parts, pipeline.device
    chosen = variants(pipeline.chai)
    pipelines: dict[ChaiSettings, Pipeline] = {}
    scores: dict[int, list[float]] = {i: [] for i in range(len(chosen))}
    latencies: dict[int, list[float]] = {i: [] for i in range(len(chosen))}
    psnrs: dict[int, list[float]] = {i: [] for i in range(len(chosen))}
    latent_shape = None
    for p, pair in enumerate(entity_sharing_pairs(pairs, seed)):
        fill = pipeline.generate(
            GenerationRequest(pair.cached, steps=pipeline.chai.full_steps, seed=seed + 2 * p,
                              capture_steps=CAPTURED)
        )
        latent_shape = tuple(fill.latent.shape)
        full_video = None  # chosen[0] is full-30: the same-seed reference of every variant
        for i, v in enumerate(chosen):
            cached = None
            runner = pipeline
            if v.chai is not None:
                cached = {k: stored_round_trip(fill.captured[k], v.dtype)
                          for k in v.chai.cache_steps}
                if v.chai not in pipelines:
                    pipelines[v.chai] = Pipeline(parts, device, v.chai)
                runner = pipelines[v.chai]
            result = runner.generate(
                GenerationRequest(pair.prompt, steps=v.steps, seed=seed + 2 * p + 1,
                                  cache_latents=cached)
            )
            scores[i].append(score(result.video, pair.prompt, judge)["overall"])
            latencies[i].append(result.timings.total_ms)
            if full_video is None:
                full_video = result.video
                psnrs[i].append(float("nan"))
            else:
                psnrs[i].append(psnr(result.video, full_video))
        log.info("ablation: pair %d/%d", p + 1, pairs)
    assert latent_shape is not None
    numel = int(np.prod(latent_shape))
    full_ms = statistics.median(latencies[0])
    plain_of = {v.steps: i for i, v in enumerate(chosen)
                if v.knob == "reference" and v.value.startswith("plain-")}
    rows = []
    for i, v in enumerate(chosen):
        ms = statistics.median(latencies[i])
        row = {
            "knob": v.knob,
            "value": v.value,
            "steps": v.steps,
            "judge": float(np.mean(scores[i])),
            "psnr": None if i == 0 else float(np.mean(psnrs[i])),
            "latency_ms_median": ms,
            "speedup_vs_full": full_ms / ms,
            "bytes_per_entry": entry_bytes(v, numel, latent_shape[0], latent_shape[1]),
            "vs_full_judge": (None if i == 0 else
                              paired_difference(scores[i], scores[0], seed=seed).as_dict()),
        }
        plain = plain_of.get(v.steps)
        if v.chai is not None and plain is not None:
            row["vs_plain_judge"] = paired_difference(scores[i], scores[plain],
                                                      seed=seed).as_dict()
            row["vs_plain_psnr"] = paired_difference(psnrs[i], psnrs[plain],
                                                     seed=seed).as_dict()
        rows.append(row)
    return {"pairs": pairs, "seed": seed, "latent_shape": list(latent_shape),
            "defaults": dataclasses.asdict(pipeline.chai), "rows": rows}


def format_table(report: dict) -> str:
    lines = [f"{'setting':<14}{'value':<15}{'steps':>6}{'judge':>8}{'median ms':>11}"
             f"{'speedup':>9}{'entry bytes':>13}  vs full-30 (judge)          "
             f"vs plain-N (judge)"]
    for r in report["rows"]:
        lines.append(
            f"{r['knob']:<14}{r['value']:<15}{r['steps']:>6}{r['judge']:>8.3f}"
            f"{r['latency_ms_median']:>11.0f}{r['speedup_vs_full']:>8.2f}x"
            f"{r['bytes_per_entry']:>13}  {format_diff(r.get('vs_full_judge')):<28}"
            f"{format_diff(r.get('vs_plain_judge'))}"
        )
    return "\n".join(lines)



def command(args) -> int:
    """``chaid-lab bench ablation`` (parsed in chaid_lab.bench.cli)."""
    from chaid.errors import ChaidError
    from chaid.models import build_parts

    pairs = 2 if args.quick else args.pairs
    check_int("--pairs", pairs, 1, 1000, ChaidError)
    check_int("--threads", args.threads, 1, 256, ChaidError)
    torch.set_num_threads(args.threads)
    logging.getLogger("chaid.engine").setLevel(logging.INFO)
    pipeline = Pipeline(build_parts(args.model, args.weights), torch.device("cpu"))
    report = run_ablation(pipeline, pairs, args.seed)
    report["model"] = args.model
    print(format_table(report))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=1))
    return 0
