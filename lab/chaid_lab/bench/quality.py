"""``chaid-lab bench quality``: CHAI against its baselines on the Shapes world, in one run.

Methods (all through the same :class:`~chaid.engine.pipeline.Pipeline`, same seeds):

* ``full-30``: the full schedule (``chai.full_steps``), no cache: the quality target.
* ``plain-8``: ``chai.fast_steps`` steps, no cache: the speed target.
* ``nirvana-vid``: whole-prompt lookup (the store's prompt matcher); a hit starts from the
  stored z_K chosen by similarity (:mod:`chaid_lab.baselines.nirvana`), a miss runs full and stores
  z_5..z_25.
* ``intra-fbc``: the full schedule with the First-Block-Cache (:mod:`chaid.engine.intra_cache`).
* ``chai-8``: entity lookup; a hit runs ``fast_steps`` steps with Cache Attention, a miss
  runs full and stores z_2..z_4.
* ``chai-8+intra``: CHAI whose misses run with the First-Block-Cache on.

Workloads:

* ``all-hit``: entity-sharing pairs (:func:`chaid_lab.shapes.chai_eval.entity_sharing_pairs`);
  each cache is pre-filled with the pairs' first prompts (one plain full run each), then
  the second prompts are served; nothing is inserted while serving.
* ``stream``: Shapes prompts in order; the first ``warm`` are served unmeasured to warm the
  caches, the rest are measured; misses are inserted under a byte budget of
  ``budget_fraction`` of the measured stream in CHAI entries (NIRVANA's larger entries get
  the same bytes).

Every cache is a real :class:`~chaid.store.cache.LatentCache` in a temporary directory, one
per cache method (their contents differ). A request's latency is its lookup, latent read and
generation (text encoding, denoising, decoding); cache writes happen after the answer, as in
the daemon, and are not counted. Methods run interleaved, prompt by prompt, so load on the
machine affects them alike.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chaid.config import MODEL_CFG_SCALE, ChaiSettings
from chaid.engine.intra_cache import IntraCacheSettings
from chaid.engine.pipeline import GenerationRequest, GenerationResult, Pipeline, resolve_device
from chaid.errors import ChaidError
from chaid.models import build_parts, get_spec
from chaid.store.analysis import Analyzer
from chaid.store.cache import LatentCache
from chaid.store.errors import EntryTooLargeError
from chaid.store.settings import StoreSettings
from chaid_lab.baselines.nirvana import NirvanaSettings, substituted_request
from chaid_lab.stats import format_diff

log = logging.getLogger(__name__)

WORKLOADS = ("all-hit", "stream")
# Bytes allowed per entry beside its latents (entity and prompt vectors) when the budget is
# sized in entries: a Shapes prompt has a few entities of 384 float32 values each.
VECTOR_ALLOWANCE = 16 << 10


@dataclass(frozen=True)
class QualityBenchConfig:
    # Model preset and its DiT weights (None: the preset's shipped weights if present).
    model: str = "tiny-shapes"
    weights: str | None = None
    device: str = "auto"
    # Entity-sharing pairs of the all-hit workload: more pairs, tighter medians, longer run.
    pairs: int = 24
    # Stream: unmeasured warm-up prompts, then measured prompts.
    warm: int = 20
    serve: int = 200
    # Cache budget as a fraction of the measured stream, in CHAI entries (paper: 10%).
    budget_fraction: float = 0.10
    seed: int = 0
    # MODEL_CFG_SCALE: the model preset's own guidance scale.
    cfg_scale: float | str | None = MODEL_CFG_SCALE
    chai: ChaiSettings = field(default_factory=ChaiSettings)
    intra: IntraCacheSettings = field(default_factory=IntraCacheSettings)
    nirvana: NirvanaSettings = field(default_factory=NirvanaSettings)
    # Judge weights (None: the shipped judge); a missing judge leaves "judge" null.
    judge: str | None = None
    workloads: tuple[str, ...] = WORKLOADS

    @classmethod
    def quick(cls, **overrides: Any) -> QualityBenchConfig:
        """A few prompts per workload: minutes on a CPU, for CI smoke tests."""
        return cls(**{"pairs": 3, "warm": 2, "serve": 6, **overrides})


@dataclass
class Run:
    """One served request of one method."""

    latency_ms: float
    result: GenerationResult
    hit: bool | None  # None: the method has no cross-inference cache
    # Whether the store's own lookup found an entry (all-hit serves the partner regardless).
    store_hit: bool | None = None


def shapes_stream(count: int, seed: int = 0) -> list[str]:
    """``count`` Shapes prompts of random scenes; the world is small, so entities recur."""
    from chaid_lab.shapes.prompts import describe
    from chaid_lab.shapes.world import sample_scene

    rng = np.random.default_rng(seed)
    return [describe(sample_scene(rng), rng) for _ in range(count)]


class _CacheMethod:
    """A cross-inference cache method with its own store: lookup → hit run or miss run."""

    def __init__(
        self, bench: QualityBench, name: str, matching: str, store: LatentCache, intra_on_miss: bool
    ) -> None:
        self.bench = bench
        self.name = name
        self.matching = matching
        self.store = store
        self.intra_on_miss = intra_on_miss

    @property
    def capture_steps(self) -> tuple[int, ...]:
        cfg = self.bench.cfg
        return cfg.nirvana.capture_steps if self.matching == "prompt" else cfg.chai.cache_steps

    def serve(
        self, request: GenerationRequest, insert: bool, partner: tuple[int, str] | None = None
    ) -> Run:
        """Serve one request: the store's lookup decides, unless ``partner`` (entry id,
        cached prompt) names the entry to use (the all-hit workload); the lookup still runs
        and is timed then, and NIRVANA's K comes from the two prompts' cosine."""
        b = self.bench
        t0 = time.perf_counter()
        lk = self.store.lookup(
            request.prompt, b.fingerprint, b.latent_shape, matching=self.matching
        )
        entry, similarity = (lk.entry_id, lk.score) if lk.hit else (None, 0.0)
        if partner is not None:
            entry = partner[0]
            if self.matching == "prompt":
                similarity = b.prompt_cosine(request.prompt, partner[1])
        hit_req = None
        if entry is not None:
            latents = {
                k: torch.from_numpy(np.asarray(v, np.float32))
                for k, v in self.store.get_latents(entry).items()
            }
            if self.matching == "prompt":
                hit_req = substituted_request(request, latents, similarity, b.cfg.nirvana)
            else:
                hit_req = dataclasses.replace(
                    request, steps=b.cfg.chai.fast_steps, cache_latents=latents
                )
        overhead_ms = (time.perf_counter() - t0) * 1e3
        if hit_req is not None:
            result = b.pipeline.generate(hit_req)
            return Run(overhead_ms + result.timings.total_ms, result, True, lk.hit)
        miss = dataclasses.replace(
            request,
            steps=b.full_steps,
            capture_steps=self.capture_steps,
            intra_cache=b.cfg.intra if self.intra_on_miss else None,
        )
        result = b.pipeline.generate(miss)
        if insert:
            self.fill(request.prompt, result)
        return Run(overhead_ms + result.timings.total_ms, result, False, lk.hit)

    def fill(self, prompt: str, result: GenerationResult) -> int | None:
        """Cache a full run's captured latents; the entry id, or None if too large."""
        latents = {k: result.captured[k] for k in self.capture_steps}
        try:
            return self.store.insert(prompt, latents, self.bench.fingerprint).entry_id
        except EntryTooLargeError:
            log.warning("%s: an entry exceeds the whole budget; not cached", self.name)
            return None


class QualityBench:
    """Runs the workloads of one :class:`QualityBenchConfig`; see the module docstring."""

    def __init__(self, cfg: QualityBenchConfig, work_dir: Path) -> None:
        self.cfg = cfg
        self.work_dir = work_dir
        cfg.intra.validate()
        cfg.nirvana.validate()
        if cfg.nirvana.steps != cfg.chai.full_steps:
            raise ChaidError("nirvana.steps must equal chai.full_steps (one full schedule)")
        spec = get_spec(cfg.model)
        weights = cfg.weights
        if weights is None and spec.dit_weights is not None and spec.dit_weights.is_file():
            weights = str(spec.dit_weights)
        if weights is None:
            log.warning("%s: no DiT weights; the DiT is a seeded initialisation", cfg.model)
        self.weights = weights
        self.device = resolve_device(cfg.device)
        parts = build_parts(cfg.model, weights, device=self.device)
        self.pipeline = Pipeline(parts, self.device, cfg.chai)
        self.full_steps = cfg.chai.full_steps
        self.fingerprint = f"bench-quality-{cfg.model}"
        base = self.pipeline.resolve(GenerationRequest("a red circle", cfg_scale=cfg.cfg_scale))
        self.base = base
        self.latent_shape = tuple(parts.vae.latent_shape(base.frames, base.height, base.width))
        self.analyzer = Analyzer.from_settings(StoreSettings())
        self.judge = self._load_judge()

    def _load_judge(self):
        from chaid_lab.shapes.judge import load_judge

        try:
            return load_judge(self.cfg.judge)
        except ChaidError as exc:
            log.warning("no judge (%s): judge scores are null", exc)
            return None

    def prompt_cosine(self, a: str, b: str) -> float:
        """Whole-prompt cosine with the store's embedder (what its prompt matcher scores)."""
        va, vb = self.analyzer.prompt_vector(a), self.analyzer.prompt_vector(b)
        return float(np.dot(va, vb) / (np.linalg.norm(va) * np.linalg.norm(vb)))

    def _score(self, video: np.ndarray, prompt: str) -> float | None:
        if self.judge is None:
            return None
        from chaid_lab.shapes.judge import score

        return float(score(video, prompt, self.judge)["overall"])

    def _store(self, name: str, matching: str, budget_bytes: int) -> LatentCache:
        cfg = self.cfg
        settings = StoreSettings(
            data_dir=self.work_dir / name,
            budget_bytes=budget_bytes,
            durable=False,
            prompt_threshold=cfg.nirvana.min_similarity,
        )
        return LatentCache.open(settings, analyzer=self.analyzer, background_rebuild=False)

    def _entry_bytes(self, steps: int) -> int:
        return steps * math.prod(self.latent_shape) * 2 + VECTOR_ALLOWANCE  # float16 latents

    def _methods(self, workload: str, budget_bytes: int) -> dict[str, Callable[..., Run]]:
        cfg = self.cfg

        def fixed(**fields: Any) -> Callable[[GenerationRequest, bool], Run]:
            def serve(request: GenerationRequest, insert: bool) -> Run:
                result = self.pipeline.generate(dataclasses.replace(request, **fields))
                return Run(result.timings.total_ms, result, None)

            return serve

        stores = {
            "nirvana-vid": ("prompt", False),
            "chai-8": ("entity", False),
            "chai-8+intra": ("entity", True),
        }
        caches = {
            name: _CacheMethod(
                self,
                name,
                matching,
                self._store(f"{workload}-{name}", matching, budget_bytes),
                intra,
            )
            for name, (matching, intra) in stores.items()
        }
        self._open = list(caches.values())
        self._caches = caches
        return {
            "full-30": fixed(steps=self.full_steps),
            f"plain-{cfg.chai.fast_steps}": fixed(steps=cfg.chai.fast_steps),
            "nirvana-vid": caches["nirvana-vid"].serve,
            f"intra-{cfg.intra.method}": fixed(steps=self.full_steps, intra_cache=cfg.intra),
            "chai-8": caches["chai-8"].serve,
            "chai-8+intra": caches["chai-8+intra"].serve,
        }

    def _close(self) -> None:
        for c in getattr(self, "_open", []):
            c.store.close()
        self._open = []

    def _request(self, prompt: str, seed: int) -> GenerationRequest:
        return dataclasses.replace(self.base, prompt=prompt, seed=seed)

    def warm_up(self) -> None:
        """One short untimed run, so lazy initialisation is not charged to the first method."""
        self.pipeline.generate(dataclasses.replace(self.base, steps=2))

    def all_hit(self) -> dict[str, list[tuple[Run, float | None]]]:
        from chaid_lab.shapes.chai_eval import entity_sharing_pairs

        cfg = self.cfg
        pairs = entity_sharing_pairs(cfg.pairs, cfg.seed)
        budget = 1 << 40  # never evicts: the pre-filled cache stays whole
        methods = self._methods("all-hit", budget)
        capture = tuple(sorted(set(cfg.chai.cache_steps) | set(cfg.nirvana.capture_steps)))
        try:
            # 1. pre-fill every cache with one plain full run per cached prompt
            entries: list[dict[str, int | None]] = []
            for i, pair in enumerate(pairs):
                req = dataclasses.replace(
                    self._request(pair.cached, cfg.seed + 2 * i),
                    steps=self.full_steps,
                    capture_steps=capture,
                )
                result = self.pipeline.generate(req)
                entries.append({n: c.fill(pair.cached, result) for n, c in self._caches.items()})
            # 2. serve the partners from their pair's entry, every method in turn
            runs: dict[str, list[tuple[Run, float | None]]] = {m: [] for m in methods}
            for i, pair in enumerate(pairs):
                req = self._request(pair.prompt, cfg.seed + 2 * i + 1)
                for name, serve in methods.items():
                    entry = entries[i].get(name)
                    if name in self._caches and entry is not None:
                        run = self._caches[name].serve(req, False, (entry, pair.cached))
                    else:
                        run = serve(req, False)
                    runs[name].append((run, self._score(run.result.video, pair.prompt)))
                log.info("all-hit %d/%d done", i + 1, len(pairs))
            return runs
        finally:
            self._close()

    def stream(self) -> dict[str, list[tuple[Run, float | None]]]:
        cfg = self.cfg
        prompts = shapes_stream(cfg.warm + cfg.serve, cfg.seed + 1000)
        entries = max(1, round(cfg.budget_fraction * cfg.serve))
        budget = entries * self._entry_bytes(len(cfg.chai.cache_steps))
        methods = self._methods("stream", budget)
        try:
            runs: dict[str, list[tuple[Run, float | None]]] = {m: [] for m in methods}
            for i, prompt in enumerate(prompts):
                req = self._request(prompt, cfg.seed + 5000 + i)
                measured = i >= cfg.warm
                for name, serve in methods.items():
                    run = serve(req, True)
                    if measured:
                        runs[name].append((run, self._score(run.result.video, prompt)))
                if measured and (i - cfg.warm + 1) % 10 == 0:
                    log.info("stream %d/%d done", i - cfg.warm + 1, cfg.serve)
            return runs
        finally:
            self._close()

    def run(self) -> dict[str, Any]:
        """Both workloads; returns the report (the ``methods`` list and the settings)."""
        t0 = time.perf_counter()
        self.warm_up()
        rows: list[dict[str, Any]] = []
        for workload in self.cfg.workloads:
            runs = self.all_hit() if workload == "all-hit" else self.stream()
            rows.extend(summarise(workload, runs, self.cfg))
        cfg = self.cfg
        return {
            "model": cfg.model,
            "weights": self.weights,
            "device": str(self.device),
            "device_name": (
                torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
            ),
            "torch_threads": torch.get_num_threads(),
            "judge_available": self.judge is not None,
            "settings": {
                "pairs": cfg.pairs,
                "warm": cfg.warm,
                "serve": cfg.serve,
                "budget_fraction": cfg.budget_fraction,
                "seed": cfg.seed,
                "cfg_scale": self.base.cfg_scale,
                "chai": dataclasses.asdict(cfg.chai),
                "intra": dataclasses.asdict(cfg.intra),
                "nirvana": dataclasses.asdict(cfg.nirvana),
                "video": {
                    "frames": self.base.frames,
                    "height": self.base.height,
                    "width": self.base.width,
                },
            },
            "methods": rows,
            "duration_s": round(time.perf_counter() - t0, 1),
        }


def _nominal_steps(name: str, cfg: QualityBenchConfig) -> int:
    return cfg.chai.fast_steps if name.startswith(("plain-", "chai-")) else cfg.chai.full_steps


def summarise(
    workload: str, runs: dict[str, list[tuple[Run, float | None]]], cfg: QualityBenchConfig
) -> list[dict[str, Any]]:
    """One row per method: latency, speedup, judge, hit rates, counts of steps run and
    skipped, PSNR to the same request's full-30 video, and paired differences (95%
    bootstrap intervals over requests) of the judge against full-30 and, for the methods
    that run the fast steps, of the judge and PSNR against plain-N."""
    from chaid_lab.fidelity import psnr
    from chaid_lab.stats import paired_difference

    full = statistics.median(r.latency_ms for r, _ in runs["full-30"])
    plain_name = f"plain-{cfg.chai.fast_steps}"

    def judge_of(name: str) -> list[float]:
        return [np.nan if s is None else s for _, s in runs[name]]

    def psnr_of(name: str) -> list[float]:
        # A cache method's miss runs the full schedule from the same seed: its video is
        # full-30's (PSNR infinite), so only its hits are compared (NaN marks the rest).
        return [np.nan if r.hit is False else psnr(r.result.video, f.result.video)
                for (r, _), (f, _) in zip(runs[name], runs["full-30"], strict=True)]

    plain_psnr = psnr_of(plain_name) if plain_name in runs else None
    rows = []
    for name, items in runs.items():
        latency = statistics.median(r.latency_ms for r, _ in items)
        scores = [s for _, s in items if s is not None]
        hits = [r.hit for r, _ in items if r.hit is not None]
        store_hits = [r.store_hit for r, _ in items if r.store_hit is not None]
        rows.append(
            {
                "name": name,
                "workload": workload,
                "steps": _nominal_steps(name, cfg),
                "latency_ms_median": round(latency, 2),
                "speedup_vs_full": round(full / latency, 3),
                "judge": round(float(np.mean(scores)), 4) if scores else None,
                "hit_rate": round(sum(hits) / len(hits), 4) if hits else None,
                # the store's own lookup (all-hit serves the pair's entry whatever it finds)
                "store_hit_rate": (
                    round(sum(store_hits) / len(store_hits), 4) if store_hits else None
                ),
                "requests": len(items),
                "steps_run_mean": round(float(np.mean([r.result.steps_run for r, _ in items])), 2),
                "intra_skipped_mean": round(
                    float(np.mean([len(r.result.intra_skipped) for r, _ in items])), 2
                ),
            }
        )
        row = rows[-1]
        if name != "full-30":
            own_psnr = psnr_of(name)
            hits_psnr = [v for v in own_psnr if not np.isnan(v)]
            row["psnr_vs_full"] = round(float(np.mean(hits_psnr)), 3) if hits_psnr else None
            if scores:
                row["vs_full_judge"] = paired_difference(
                    judge_of(name), judge_of("full-30"), seed=cfg.seed).as_dict()
            if name.startswith("chai-") and plain_psnr is not None:
                if scores:
                    row["vs_plain_judge"] = paired_difference(
                        judge_of(name), judge_of(plain_name), seed=cfg.seed).as_dict()
                row["vs_plain_psnr"] = paired_difference(own_psnr, plain_psnr,
                                                         seed=cfg.seed).as_dict()
    return rows


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"{'workload':<9}{'method':<14}{'steps':>6}{'median ms':>11}{'speedup':>9}"
        f"{'judge':>8}{'hits':>7}{'skipped':>9}{'PSNR':>7}  vs full-30 (judge)"
        f"          vs plain-N (judge)"
    ]
    for m in report["methods"]:
        judge = "-" if m["judge"] is None else f"{m['judge']:.3f}"
        hits = "-" if m["hit_rate"] is None else f"{m['hit_rate']:.2f}"
        psnr = "-" if m.get("psnr_vs_full") is None else f"{m['psnr_vs_full']:.1f}"
        lines.append(
            f"{m['workload']:<9}{m['name']:<14}{m['steps']:>6}"
            f"{m['latency_ms_median']:>11.1f}{m['speedup_vs_full']:>8.2f}x"
            f"{judge:>8}{hits:>7}{m['intra_skipped_mean']:>9.1f}{psnr:>7}"
            f"  {format_diff(m.get('vs_full_judge')):<28}{format_diff(m.get('vs_plain_judge'))}"
        )
    return "\n".join(lines)



def run_quality_bench(cfg: QualityBenchConfig, work_dir: Path | None = None) -> dict[str, Any]:
    """Run the benchmark with stores under ``work_dir`` (default: a temporary directory,
    removed afterwards)."""
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        return QualityBench(cfg, work_dir).run()
    with tempfile.TemporaryDirectory(prefix="chaid-bench-quality-") as tmp:
        return QualityBench(cfg, Path(tmp)).run()


def command(args: Any) -> int:
    """The ``chaid-lab bench quality`` command (arguments from :func:`chaid_lab.bench.cli`)."""
    import json

    if args.threads:
        torch.set_num_threads(args.threads)
    make = QualityBenchConfig.quick if args.quick else QualityBenchConfig
    overrides: dict[str, Any] = {
        "model": args.model,
        "weights": args.weights,
        "device": args.device,
        "seed": args.seed,
        "judge": args.judge,
        "intra": IntraCacheSettings(threshold=args.intra_threshold),
    }
    for key in ("pairs", "warm", "serve"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.workloads:
        overrides["workloads"] = tuple(w for w in args.workloads.split(",") if w)
        unknown = set(overrides["workloads"]) - set(WORKLOADS)
        if unknown:
            raise ChaidError(f"unknown workloads {sorted(unknown)} (known: {WORKLOADS})")
    cfg = make(**overrides)
    report = run_quality_bench(cfg, args.work_dir)
    report["quick"] = bool(args.quick)
    report["command"] = "chaid-lab " + " ".join(sys.argv[1:])
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    return 0
