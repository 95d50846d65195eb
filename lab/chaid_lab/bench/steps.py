"""``chaid-lab bench steps``: the step curve, paired, on every metric.

For entity-sharing prompt pairs of the Shapes world (:func:`entity_sharing_pairs`: half
share the scene, half the object), the first prompt's full run fills a cache entry; the
second prompt is then generated from one seed by full-30, plain-N and CHAI-N for every N of
``--steps`` (CHAI-N: N steps with Cache Attention at the cached steps that fit in N). Each
video is scored by the judge and by the fidelity metrics of :mod:`chaid_lab.fidelity`
against the true render of its scene and the same-seed full-30 video.

Variants of CHAI run beside it with ``--variants`` (:data:`VARIANTS`): ``chai-t`` feeds
each fast step the full run's latent of the nearest noise level t (instead of the same step
index: with 8 fast steps, fast step 2 sits at t≈0.95 of the schedule, full step 2 at
t≈0.99); ``chai-cond`` attends to the cache in the conditional branch only; ``chai-kv``
takes keys and values from the cached and the current tokens; ``chai-t-kv`` both feeds.

The report compares, for every N, CHAI-N with plain-N and each method with full-30: the
paired mean difference over pairs with its 95% bootstrap interval (:mod:`chaid_lab.stats`),
for all pairs and per pair kind. Distribution metrics (Fréchet and kernel distances to the
true renders) get a bootstrap interval over the same resampled pairs for both methods.

Long runs resume: each finished pair is appended to ``rows-<shard>.jsonl`` in the output
directory, and a run skips the pairs already there. ``--shard K/N`` runs every Nth pair,
so N processes share the work; whichever finds every pair done writes the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chaid.config import MODEL_CFG_SCALE, ChaiSettings
from chaid.errors import ChaidError
from chaid_lab.stats import PairedDiff, format_diff, paired_difference

log = logging.getLogger(__name__)

# The step counts of the curve: where few-step sampling starts to lose, and where it ties.
STEP_COUNTS = (2, 3, 4, 6, 8, 12)
# Pairs of a full run: enough for a judge interval of half-width <= 0.005 on the paired
# differences measured here (docs/results.md, "How many pairs").
DEFAULT_PAIRS = 256
QUICK_PAIRS = 4
GROUPS = ("all", "scene", "object")
# Per-video metrics, and whether a larger value is better. The high-frequency ratio to the
# true render compares by its distance from 1 (|log ratio|): blur and noise both move it.
METRICS: dict[str, bool] = {
    "judge": True,
    "psnr": True,
    "ssim": True,
    "hf_error": False,
    "motion_error": False,
    "jump_excess": False,
}
# The discriminating regime (docs/results.md): the tiny-shapes model at guidance 7.5, where
# plain 8-step sampling loses to full-30 on the judge and on fidelity (at the preset's own
# 2.0 it does not). Pairs: a judge interval of half-width about 0.012 on plain-8 − full-30,
# which sits 0.025 below 0.
REGIME_CFG_SCALE = 7.5
REGIME_PAIRS = 128
REGIME_STEPS = (8,)
# The paper's feed and the best feed measured (cache+current keys and values).
REGIME_VARIANTS = ("chai", "chai-kv")
# Bootstrap resamples of the distribution metrics (each one a Fréchet distance per method).
DISTRIBUTION_RESAMPLES = 200


@dataclass(frozen=True)
class StepCurveConfig:
    model: str = "tiny-shapes"
    weights: str | None = None
    device: str = "auto"
    pairs: int = DEFAULT_PAIRS
    steps: tuple[int, ...] = STEP_COUNTS
    seed: int = 0
    # MODEL_CFG_SCALE: the preset's own guidance scale.
    cfg_scale: float | str | None = MODEL_CFG_SCALE
    chai: ChaiSettings = field(default_factory=ChaiSettings)
    # Cache methods beside plain-N: "chai" (the paper's step-index feed) and "chai-t" (the
    # nearest noise level's latent).
    variants: tuple[str, ...] = ("chai",)
    # sampler.eta and sampler.eta_until of every run (None: the preset's)
    eta: float | None = None
    eta_until: float | None = None


def chai_at(chai: ChaiSettings, steps: int) -> ChaiSettings:
    """CHAI with ``steps`` fast steps: Cache Attention at the cached steps that fit."""
    fitting = tuple(k for k in chai.cache_steps if k <= steps)
    if not fitting:
        raise ChaidError(f"no cached step of {list(chai.cache_steps)} fits in {steps} steps")
    return dataclasses.replace(chai, fast_steps=steps, cache_steps=fitting)


# Variant name → (which cached step feeds fast step k: "index" k itself, "t" the nearest
# noise level, "last" the full run's last step; the CHAI settings it changes).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "chai": ("index", {}),
    "chai-t": ("t", {}),
    "chai-cond": ("index", {"branches": "cond"}),
    "chai-kv": ("index", {"kv_source": "cache+current"}),
    "chai-t-kv": ("t", {"kv_source": "cache+current"}),
    # half the pull of the paper's feed: self + 0.5 (cache - self)
    "chai-blend": ("index", {"blend": 0.5}),
    # cache+current keys at more fast steps (2-6), each fed the nearest noise level
    "chai-t-kv-more": ("t", {"kv_source": "cache+current", "cache_steps": (2, 3, 4, 5, 6)}),
    # cache+current keys in every spatial block of the tiny model, not only the first
    "chai-kv-deep": ("index", {"kv_source": "cache+current", "cache_blocks": (0, 1, 2, 3)}),
    # every cached step fed the full run's last latent (the nearly clean video), cache+current
    "chai-last-kv": ("last", {"kv_source": "cache+current"}),
}


def method_names(steps: tuple[int, ...], variants: tuple[str, ...] = ("chai",)) -> list[str]:
    return ["full-30", *(f"{kind}-{n}" for kind in ("plain", *variants) for n in steps)]


def t_matched(fast: int, full: int, ratio: float, steps: tuple[int, ...]) -> dict[int, int]:
    """For each fast step k of ``steps``, the full-run step whose timestep is nearest to
    fast step k's: the cached latent of the same noise level."""
    from chaid.engine.sampler import schedule

    t_fast, t_full = schedule(fast, ratio), schedule(full, ratio)
    return {k: 1 + int(np.argmin([abs(t - t_fast[k - 1]) for t in t_full])) for k in steps}


class StepCurve:
    """Generates and scores the pairs of one shard; see the module docstring."""

    def __init__(self, cfg: StepCurveConfig) -> None:
        from chaid.engine.pipeline import GenerationRequest, Pipeline, resolve_device
        from chaid.models import build_parts
        from chaid_lab.shapes.chai_eval import entity_sharing_pairs
        from chaid_lab.shapes.judge import load_judge

        self.cfg = cfg
        device = resolve_device(cfg.device)
        parts = build_parts(cfg.model, cfg.weights, device=device)
        sampler = {"eta": cfg.eta, "eta_until": cfg.eta_until}
        self.full = Pipeline(parts, device, cfg.chai, **sampler)
        self.fast = {n: Pipeline(parts, device, chai_at(cfg.chai, n), **sampler)
                     for n in cfg.steps}
        self.base = self.full.resolve(GenerationRequest("a red circle", cfg_scale=cfg.cfg_scale))
        self.pairs = entity_sharing_pairs(cfg.pairs, cfg.seed)
        self.judge = load_judge()
        unknown = set(cfg.variants) - set(VARIANTS)
        if unknown:
            raise ChaidError(f"unknown variants {sorted(unknown)} (known: {', '.join(VARIANTS)})")
        # One pipeline per step count and variant: they share the model parts.
        self.variant_pipes = {
            (n, kind): Pipeline(parts, device, chai_at(
                dataclasses.replace(cfg.chai, **VARIANTS[kind][1]), n), **sampler)
            for n in cfg.steps for kind in cfg.variants}
        from chaid.engine.sampler import transform_ratio

        latent = parts.vae.latent_shape(self.base.frames, self.base.height, self.base.width)
        self.ratio = transform_ratio(self.base.height, self.base.width, latent[1],
                                     parts.dit.cfg.input_sq_size)
        # (N, variant) → which full step's latent feeds each of its fast cache steps
        self.feeds = {
            (n, kind): self._feed(VARIANTS[kind][0], n, p.chai.cache_steps)
            for (n, kind), p in self.variant_pipes.items()}

    def _feed(self, kind: str, n: int, steps: tuple[int, ...]) -> dict[int, int]:
        full = self.cfg.chai.full_steps
        if kind == "t":
            return t_matched(n, full, self.ratio, steps)
        if kind == "last":
            return {k: full for k in steps}
        return {k: k for k in steps}

    def run_pair(self, index: int) -> dict[str, Any]:
        from chaid_lab.fidelity import judge_features, per_video
        from chaid_lab.shapes.judge import score
        from chaid_lab.shapes.world import render

        cfg, base, pair = self.cfg, self.base, self.pairs[index]
        full_steps = cfg.chai.full_steps
        # 1. the cached prompt's full run fills the entry (every step CHAI may read)
        capture = set(cfg.chai.cache_steps) | {
            m for feed in self.feeds.values() for m in feed.values()}
        cached = self.full.generate(dataclasses.replace(
            base, prompt=pair.cached, seed=cfg.seed + 2 * index, steps=full_steps,
            capture_steps=tuple(sorted(capture))))
        # 2. the prompt, every method from one seed
        request = dataclasses.replace(base, prompt=pair.prompt, seed=cfg.seed + 2 * index + 1)
        results = {"full-30": self.full.generate(dataclasses.replace(request, steps=full_steps))}
        for n, pipeline in self.fast.items():
            results[f"plain-{n}"] = pipeline.generate(dataclasses.replace(request, steps=n))
            for kind in cfg.variants:
                latents = {k: cached.captured[m] for k, m in self.feeds[n, kind].items()}
                results[f"{kind}-{n}"] = self.variant_pipes[n, kind].generate(
                    dataclasses.replace(request, steps=n, cache_latents=latents))
        # 3. scores: the judge, fidelity against truth and against full-30, judge features
        truth = render(pair.scene, base.frames, base.height, base.width)
        full_video = results["full-30"].video
        names = list(results)
        features = judge_features([results[m].video for m in names] + [truth], self.judge)
        methods = {}
        for m in names:
            video = results[m].video
            metrics = per_video(video, truth, None if m == "full-30" else full_video)
            methods[m] = {
                "judge": float(score(video, pair.prompt, self.judge)["overall"]),
                **{k: round(v, 5) for k, v in metrics.items()},
                "ms": round(results[m].timings.total_ms, 1),
            }
        return {
            "index": index,
            "prompt": pair.prompt,
            "cached": pair.cached,
            "shared": pair.shared,
            "methods": methods,
            "features": {name: np.round(f, 4).tolist()
                         for name, f in zip([*names, "truth"], features, strict=True)},
        }


# -- rows on disk ----------------------------------------------------------------------------


def read_rows(out: Path) -> dict[int, dict[str, Any]]:
    """Every finished pair in ``out`` (all shards), by index; a torn last line is skipped."""
    rows: dict[int, dict[str, Any]] = {}
    for path in sorted(out.glob("rows-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a run stopped mid-write: that pair runs again
                continue
            rows[row["index"]] = row
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def run(cfg: StepCurveConfig, out: Path, shard: tuple[int, int] = (0, 1)) -> dict | None:
    """Run this shard's missing pairs; return the report once every pair is done."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(_config_dict(cfg)))  # as it reads back
    done = read_rows(out)
    saved = out / "config.json"
    if done and saved.is_file() and _identity({**_CONFIG_BEFORE,
                                               **json.loads(saved.read_text())}
                                              ) != _identity(config):
        raise ChaidError(f"{out} holds pairs of another configuration ({saved});"
                         " choose another --out or remove that directory")
    saved.write_text(json.dumps(config, indent=2))
    k, n = shard
    todo = [i for i in range(cfg.pairs) if i % n == k and i not in done]
    if todo:
        curve = StepCurve(cfg)
        path = out / f"rows-{k}.jsonl"
        t0 = time.perf_counter()
        for count, i in enumerate(todo, 1):
            append_row(path, curve.run_pair(i))
            rate = (time.perf_counter() - t0) / count
            log.info("pair %d done (%d/%d of this shard, %.1f s each, ~%.0f min left)",
                     i, count, len(todo), rate, rate * (len(todo) - count) / 60)
    rows = read_rows(out)
    missing = [i for i in range(cfg.pairs) if i not in rows]
    if missing:
        log.info("%d pairs still missing (other shards); no report yet", len(missing))
        return None
    return report([rows[i] for i in range(cfg.pairs)], cfg)


def _config_dict(cfg: StepCurveConfig) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["steps"] = list(cfg.steps)
    out["variants"] = list(cfg.variants)
    from chaid.models import get_spec
    from chaid.models.weights import file_digest

    spec = get_spec(cfg.model)
    for key in ("eta", "eta_until"):  # the sampler the runs use: unset is the preset's
        if out[key] is None:
            out[key] = getattr(spec, key)
    # The DiT's weights by content: retrained weights under the same name are another model,
    # whose rows must not join these.
    weights = cfg.weights or spec.dit_weights
    out["dit_digest"] = file_digest(weights) if weights is not None and Path(
        weights).exists() else "init"
    return out


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """What must match for rows to join one report: the configuration without the path the
    weights were read from (dit_digest names them by content, wherever they lie)."""
    return {k: v for k, v in config.items() if k != "weights"}


# Rows written before the configuration named the sampler were sampled with the ODE.
_CONFIG_BEFORE = {"eta": 0.0, "eta_until": 0.0}


# -- the report ------------------------------------------------------------------------------


def _metric(row: dict, method: str, name: str) -> float:
    m = row["methods"][method]
    if name == "hf_error":
        return abs(math.log(max(m["hf_ratio"], 1e-9)))
    return float(m.get(name, math.nan))


def _mean(values: list[float]) -> float | None:
    """Mean of the finite values (full-30 has no PSNR to itself): None when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return round(float(np.mean(finite)), 4) if finite else None


def _distribution(rows: list[dict], methods: list[str], seed: int) -> dict[str, Any]:
    """Fréchet and kernel distances of each method's videos to the true renders, with a
    bootstrap interval over pairs; and paired intervals of their differences."""
    from chaid_lab.fidelity import feature_space, frechet_distance, kernel_distance

    raw = {m: np.asarray([r["features"][m] for r in rows]) for m in [*methods, "truth"]}
    space = feature_space(raw["truth"])
    feats = {m: space.project(f) for m, f in raw.items()}
    out: dict[str, Any] = {"fd": {}, "kid": {}}
    for m in methods:
        out["fd"][m] = round(frechet_distance(feats[m], feats["truth"]), 4)
        out["kid"][m] = round(1e3 * kernel_distance(feats[m], feats["truth"], seed=seed), 4)
    # Bootstrap over pairs: the same resampled pairs for every method, so differences pair.
    rng = np.random.default_rng(seed)
    boots = {m: [] for m in methods}
    for _ in range(DISTRIBUTION_RESAMPLES):
        idx = rng.integers(0, len(rows), len(rows))
        for m in methods:
            boots[m].append(frechet_distance(feats[m][idx], feats["truth"][idx]))
    out["fd_boot"] = {m: np.asarray(v) for m, v in boots.items()}
    return out


def _fd_difference(boot: dict[str, np.ndarray], a: str, b: str, point: float, n: int
                   ) -> PairedDiff:
    d = boot[a] - boot[b]
    low, high = (float(x) for x in np.percentile(d, [2.5, 97.5]))
    verdict = "loss" if low > 0 else "win" if high < 0 else "tie"
    return PairedDiff(point, low, high, n, verdict, higher_is_better=False)


def report(rows: list[dict], cfg: StepCurveConfig) -> dict[str, Any]:
    methods = method_names(cfg.steps, cfg.variants)
    groups = {g: [r for r in rows if g == "all" or r["shared"] == g] for g in GROUPS}
    summary: dict[str, Any] = {}
    comparisons: list[dict[str, Any]] = []
    for g, grows in groups.items():
        if len(grows) < 2:
            continue
        means = {m: {k: _mean([_metric(r, m, k) for r in grows]) for k in METRICS}
                 for m in methods}
        for m in methods:
            means[m]["ms_median"] = round(float(np.median([r["methods"][m]["ms"]
                                                           for r in grows])), 1)
            means[m]["hf_ratio"] = round(float(np.mean([r["methods"][m]["hf_ratio"]
                                                         for r in grows])), 4)
        dist = _distribution(grows, methods, cfg.seed)
        for m in methods:
            means[m]["fd"] = dist["fd"][m]
            means[m]["kid_x1e3"] = dist["kid"][m]
        summary[g] = means

        def compare(a: str, b: str, metrics: list[str], _g=g, _rows=grows) -> None:
            for k in metrics:
                diff = paired_difference([_metric(r, a, k) for r in _rows],
                                         [_metric(r, b, k) for r in _rows],
                                         higher_is_better=METRICS[k], seed=cfg.seed)
                comparisons.append({"group": _g, "a": a, "b": b, "metric": k,
                                    **diff.as_dict()})

        for n in cfg.steps:
            pairs_n = [(f"plain-{n}", "full-30")]
            for kind in cfg.variants:
                compare(f"{kind}-{n}", f"plain-{n}", list(METRICS))
                pairs_n += [(f"{kind}-{n}", f"plain-{n}"), (f"{kind}-{n}", "full-30")]
            for m in (f"plain-{n}", *(f"{kind}-{n}" for kind in cfg.variants)):
                compare(m, "full-30", [k for k in METRICS if k not in ("psnr", "ssim")])
            for a, b in pairs_n:
                fd = _fd_difference(dist["fd_boot"], a, b, dist["fd"][a] - dist["fd"][b],
                                    len(grows))
                comparisons.append({"group": g, "a": a, "b": b, "metric": "fd",
                                    **fd.as_dict()})
    return {
        "config": _config_dict(cfg),
        "pairs": len(rows),
        "pair_kinds": {g: len(v) for g, v in groups.items()},
        "methods": methods,
        "summary": summary,
        "comparisons": comparisons,
        "jumps": jumps_by_motion(rows, methods),
    }


# A jump excess above this (a mean luma change of 2% of the range in one frame, beyond the
# clip's own median change) is a visible jump: no true render of the world reaches it.
VISIBLE_JUMP = 0.02


def jumps_by_motion(rows: list[dict], methods: list[str]) -> dict[str, Any]:
    """Jump excess of prompts with a bouncing object against the others, per method: the
    world's bounce is continuous, so a jump at the bounce is the model's."""
    from chaid_lab.shapes.prompts import parse

    def bouncing(prompt: str) -> bool:
        parsed = parse(prompt)
        return parsed is not None and any(o.motion == "bouncing" for o in parsed.objects)

    kinds = {"bouncing": [r for r in rows if bouncing(r["prompt"])]}
    kinds["other"] = [r for r in rows if r not in kinds["bouncing"]]
    out: dict[str, Any] = {"visible_jump": VISIBLE_JUMP}
    for kind, krows in kinds.items():
        if not krows:
            continue
        out[kind] = {"prompts": len(krows)}
        for m in methods:
            v = np.asarray([r["methods"][m]["jump_excess"] for r in krows])
            out[kind][m] = {"mean": round(float(v.mean()), 4),
                            "visible": round(float((v > VISIBLE_JUMP).mean()), 3)}
    return out


def find(report: dict, a: str, b: str, metric: str, group: str = "all") -> dict | None:
    for c in report["comparisons"]:
        if (c["a"], c["b"], c["metric"], c["group"]) == (a, b, metric, group):
            return c
    return None


def _cell(c: dict | None) -> str:
    return format_diff(c, 4, markdown=True)


def tables(report: dict) -> str:
    """Markdown: per pair kind, one row per N with the judge and fidelity of plain-N and
    CHAI-N and their paired differences."""
    steps = report["config"]["steps"]
    out = []
    for g, means in report["summary"].items():
        full = means["full-30"]
        out.append(f"### {g} pairs ({report['pair_kinds'][g]}); full-30: judge "
                   f"{full['judge']:.4f}, FD {full['fd']:.3f}, KIDx1e3 {full['kid_x1e3']:.3f},"
                   f" HF ratio {full['hf_ratio']:.3f}, jump excess {full['jump_excess']:+.4f}\n")
        out.append("| N | judge plain | judge CHAI | CHAI − plain (judge) | plain − full-30 "
                   "(judge) | CHAI − full-30 (judge) | PSNR plain / CHAI (dB) | CHAI − plain "
                   "(PSNR) | SSIM plain / CHAI | FD plain / CHAI | CHAI − plain (FD) |"
                   " HF ratio plain / CHAI | jump excess plain / CHAI |")
        out.append("|---" * 13 + "|")
        for kind in report["config"].get("variants", ["chai"]):
            for n in steps:
                p, c = means[f"plain-{n}"], means[f"{kind}-{n}"]
                a = f"{kind}-{n}"
                label = str(n) if kind == "chai" else f"{n} ({kind})"
                out.append(
                    f"| {label} | {p['judge']:.4f} | {c['judge']:.4f} | "
                    f"{_cell(find(report, a, f'plain-{n}', 'judge', g))} | "
                    f"{_cell(find(report, f'plain-{n}', 'full-30', 'judge', g))} | "
                    f"{_cell(find(report, a, 'full-30', 'judge', g))} | "
                    f"{p['psnr']:.2f} / {c['psnr']:.2f} | "
                    f"{_cell(find(report, a, f'plain-{n}', 'psnr', g))} | "
                    f"{p['ssim']:.4f} / {c['ssim']:.4f} | {p['fd']:.3f} / {c['fd']:.3f} | "
                    f"{_cell(find(report, a, f'plain-{n}', 'fd', g))} | "
                    f"{p['hf_ratio']:.3f} / {c['hf_ratio']:.3f} | "
                    f"{p['jump_excess']:+.4f} / {c['jump_excess']:+.4f} |")
        out.append("")
    out.append("Cells: paired mean difference [95% bootstrap interval] over pairs; **win** or "
               "**loss** only when the interval excludes 0 (for FD lower is better).")
    jumps = report.get("jumps")
    if jumps:
        out += ["", f"Visible jumps (jump excess > {jumps['visible_jump']}), share of videos:", "",
                "| prompts | " + " | ".join(report["methods"]) + " |",
                "|---" * (len(report["methods"]) + 1) + "|"]
        for kind in ("bouncing", "other"):
            if kind in jumps:
                cells = " | ".join(f"{jumps[kind][m]['visible']:.2f}" for m in report["methods"])
                out.append(f"| {kind} ({jumps[kind]['prompts']}) | {cells} |")
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    from chaid_lab.shapes.suite import _require_matplotlib

    plt = _require_matplotlib()
    steps = report["config"]["steps"]
    panels = [("judge", "judge score (higher is better)"),
              ("psnr", "PSNR to same-seed full-30 (dB)"),
              ("fd", "Fréchet distance to true renders (lower is better)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"all": "-", "scene": "--", "object": ":"}
    kinds = ["plain", *report["config"].get("variants", ["chai"])]
    for ax, (metric, title) in zip(axes, panels, strict=True):
        for g, means in report["summary"].items():
            for kind, colour in zip(kinds, plt.cm.tab10.colors, strict=False):
                ys = [means[f"{kind}-{n}"][metric] for n in steps]
                ax.plot(steps, ys, styles[g], color=colour, marker="o", ms=3,
                        label=f"{kind}-N ({g})")
            if metric != "psnr":
                ax.axhline(means["full-30"][metric], color="grey", ls=styles[g], lw=0.8,
                           label=f"full-30 ({g})")
        if metric == "judge":  # the paired intervals of the first variant − plain-N, all pairs
            for n in steps:
                c = find(report, f"{kinds[1]}-{n}", f"plain-{n}", "judge")
                if c:
                    base = report["summary"]["all"][f"plain-{n}"]["judge"]
                    ax.errorbar([n], [base + c["mean"]], yerr=[[c["mean"] - c["low"]],
                                [c["high"] - c["mean"]]], color="black", capsize=3, lw=0.8)
        ax.set_xlabel("denoising steps N")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Step curve on {report['pairs']} entity-sharing pairs "
                 f"({report['config']['model']}); bars: 95% CI of CHAI-N − plain-N")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_paired(report: dict, path: Path, n: int | None = None) -> None:
    """At one step count: every paired difference with its 95% interval, one panel per
    metric (judge, PSNR to full-30, Fréchet distance), all pairs: plain-N − full-30, then
    each variant − plain-N. A bar clear of the zero line is a win or a loss."""
    from chaid_lab.shapes.suite import _require_matplotlib

    plt = _require_matplotlib()
    n = n or report["config"]["steps"][-1]
    variants = report["config"].get("variants", ["chai"])
    rows = [(f"plain-{n}", "full-30")] + [(f"{v}-{n}", f"plain-{n}") for v in variants]
    panels = [("judge", "judge (higher is better)"), ("psnr", "PSNR to same-seed full-30, dB"),
              ("fd", "Fréchet distance to true renders (lower is better)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 0.5 * len(rows) + 2), sharey=True)
    for ax, (metric, title) in zip(axes, panels, strict=True):
        for y, (a, b) in enumerate(rows):
            c = find(report, a, b, metric)
            if c is None:
                continue
            colour = {"win": "tab:green", "loss": "tab:red"}.get(c["verdict"], "tab:grey")
            ax.errorbar([c["mean"]], [y], xerr=[[c["mean"] - c["low"]], [c["high"] - c["mean"]]],
                        fmt="o", color=colour, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_yticks(range(len(rows)), [f"{a} − {b}" for a, b in rows])
    axes[0].invert_yaxis()
    cfg = report["config"]
    fig.suptitle(f"{report['pairs']} pairs, {cfg['model']}, guidance {cfg['cfg_scale']}: "
                 "paired differences, 95% intervals (green win, red loss, grey tie)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
