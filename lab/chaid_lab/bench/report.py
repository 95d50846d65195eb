"""``chaid-lab bench report``: every table and plot of docs/results.md from one command.

Runs, in this order and on this machine: the step curve, the discriminating regime
(guidance 7.5, where plain-8 loses to full-30), the model's visible defects, the quality
benchmark (all-hit and stream
workloads, every method), the CHAI ablation, the hit-rate replay of the Shapes stream over
cache sizes, and the daemon benchmark (1, 4 and 16 clients). Writes into ``--out``:

* ``results.json``: every report, the machine and the durations;
* ``tables.md``: the Markdown tables docs/results.md shows;
* ``quality-vs-latency.png`` (judge against median latency per method and workload, the
  paper's Fig. 7 analogue) and ``hit-rate-vs-cache-size.png`` (Fig. 9 analogue).

``--quick`` shrinks every part to a few prompts (minutes; a CI smoke test).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Cache sizes of the hit-rate replay, in entries of the Shapes model.
HIT_RATE_BUDGETS = (2, 5, 10, 20, 50, 100)


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    quick: bool = False
    model: str = "tiny-shapes"
    threads: int = 1
    seed: int = 0

    @property
    def pairs(self) -> int:
        return 3 if self.quick else 24

    @property
    def stream(self) -> tuple[int, int]:
        """(warm, serve) of the quality stream."""
        return (2, 6) if self.quick else (20, 120)

    @property
    def ablation_pairs(self) -> int:
        return 2 if self.quick else 24

    @property
    def daemon(self) -> tuple[tuple[int, ...], int, int]:
        """(client levels, warm, serve) of the daemon benchmark."""
        return ((1, 4), 2, 4) if self.quick else ((1, 4, 16), 20, 64)

    @property
    def hit_rate_prompts(self) -> int:
        return 60 if self.quick else 1000


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _steps(cfg: ReportConfig) -> dict:
    """The step curve (chaid_lab.bench.steps); its rows go to a cache directory, so a stopped
    report resumes where it stopped."""
    from chaid_lab.bench.steps import (
        DEFAULT_PAIRS,
        QUICK_PAIRS,
        STEP_COUNTS,
        StepCurveConfig,
    )

    pairs = QUICK_PAIRS if cfg.quick else DEFAULT_PAIRS
    scfg = StepCurveConfig(model=cfg.model, pairs=pairs, seed=cfg.seed,
                           steps=(2, 8) if cfg.quick else STEP_COUNTS)
    return _run_curve(scfg, "steps")


def _regime(cfg: ReportConfig) -> dict:
    """The discriminating regime: plain-8, CHAI-8 (two feeds) and full-30 at guidance 7.5,
    paired over REGIME_PAIRS; rows cached like the step curve's."""
    from chaid_lab.bench.steps import (
        QUICK_PAIRS,
        REGIME_CFG_SCALE,
        REGIME_PAIRS,
        REGIME_STEPS,
        REGIME_VARIANTS,
        StepCurveConfig,
    )

    pairs = QUICK_PAIRS if cfg.quick else REGIME_PAIRS
    scfg = StepCurveConfig(model=cfg.model, pairs=pairs, seed=cfg.seed, steps=REGIME_STEPS,
                           cfg_scale=REGIME_CFG_SCALE, variants=REGIME_VARIANTS)
    return _run_curve(scfg, "regime")


def _defects(cfg: ReportConfig) -> dict:
    """The visible defects of the model (chaid_lab.shapes.defects): 10 seeds per prompt,
    with the preset's sampler and beside it the ODE's (where the preset samples another
    way) and the ODE's with the temporal guidance that stops the shape changes there."""
    from chaid.engine.pipeline import Pipeline
    from chaid.models import build_parts
    from chaid_lab.shapes import defects

    seeds = 1 if cfg.quick else defects.DEFAULT_SEEDS
    parts = build_parts(cfg.model)
    cpu = torch.device("cpu")
    report = defects.run(Pipeline(parts, cpu), seeds=seeds)
    scale = defects.TEMPORAL_GUIDANCE
    others = [("the ODE", Pipeline(parts, cpu, eta=0.0))] if parts.spec.eta else []
    others.append((f"the ODE, temporal guidance {scale}",
                   Pipeline(parts, cpu, temporal_guidance=scale, eta=0.0)))
    report["variants"] = []
    for label, pipeline in others:
        other = defects.run(pipeline, seeds=seeds)
        report["variants"].append({"label": label, "sampler": other["sampler"],
                                   "checks": other["checks"], "seconds": other["seconds"]})
    for part in (report, *report["variants"]):
        for check in part["checks"].values():  # the readings stay in the part's own runs
            check.pop("rows")
    return report


def _run_curve(scfg: Any, name: str) -> dict:
    """A step-curve run whose rows stay in the user's cache directory, so a stopped report
    resumes where it stopped."""
    from chaid_lab.bench.steps import run

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chaid"
    report = run(scfg, cache / f"report-{name}-{scfg.model}-{scfg.pairs}-{scfg.seed}")
    assert report is not None  # one shard: every pair is done when run returns
    return report


def _quality(cfg: ReportConfig) -> dict:
    from chaid_lab.bench.quality import QualityBenchConfig, run_quality_bench

    warm, serve = cfg.stream
    qcfg = QualityBenchConfig(model=cfg.model, pairs=cfg.pairs, warm=warm, serve=serve,
                              seed=cfg.seed)
    return run_quality_bench(qcfg)


def _ablation(cfg: ReportConfig) -> dict:
    from chaid.engine.pipeline import Pipeline
    from chaid.models import build_parts
    from chaid_lab.bench.ablation import run_ablation

    pipeline = Pipeline(build_parts(cfg.model), torch.device("cpu"))
    return run_ablation(pipeline, cfg.ablation_pairs, cfg.seed)


def _hit_rates(cfg: ReportConfig) -> dict:
    """The Shapes stream replayed through lookup + insert at several cache sizes."""
    from chaid.models import get_spec
    from chaid.store.analysis import Analyzer
    from chaid.store.settings import StoreSettings
    from chaid_lab.bench.cache import run_cache_bench
    from chaid_lab.bench.quality import shapes_stream

    spec = get_spec(cfg.model)  # only the latent's size is needed: no DiT, no text encoder
    shape = spec.vae().latent_shape(spec.frames, spec.height, spec.width)
    entry = 3 * 2 * int(torch.Size(shape).numel())  # z_2..z_4 in fp16
    settings = StoreSettings(embedder_threads=1)
    return run_cache_bench(
        shapes_stream(cfg.hit_rate_prompts, cfg.seed + 1), Analyzer.from_settings(settings),
        payload_bytes=entry, budget_entries=HIT_RATE_BUDGETS, policies=("lru",),
        matchers=("entity", "prompt"), sizes=(), seed=cfg.seed, base=settings,
    )


def _daemon(cfg: ReportConfig) -> dict:
    from chaid_lab.bench.daemon import run_daemon_bench

    levels, warm_n, serve_n = cfg.daemon
    # One worker, and one per core up to two (server.cpu_workers) where there are two.
    workers = (1,) if cfg.quick or (os.cpu_count() or 1) < 2 else (1, 2)
    return run_daemon_bench(cfg.model, levels, warm_n, serve_n, cfg.seed, workers,
                            batches=(1, 2) if cfg.quick else (1, 2, 4, 8))


PARTS = {"steps": _steps, "regime": _regime, "defects": _defects, "quality": _quality,
         "ablation": _ablation, "hit_rates": _hit_rates, "daemon": _daemon}


def run_report(cfg: ReportConfig, out: Path, parts: tuple[str, ...] = tuple(PARTS)) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    report: dict[str, Any] = {"config": dataclasses.asdict(cfg), "machine": machine(),
                              "seconds": {}}
    previous = out / "results.json"
    if set(parts) != set(PARTS) and previous.is_file():
        # A run of some parts updates those and keeps the others' measurements.
        kept = json.loads(previous.read_text())
        if kept.get("config") == report["config"]:
            report["seconds"] = kept.get("seconds", {})
            report.update({k: v for k, v in kept.items() if k in PARTS and k not in parts})
    for name in parts:
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        report[name] = PARTS[name](cfg)
        report["seconds"][name] = round(time.perf_counter() - t0, 1)
        # written after every part, so a long run that stops keeps what it measured
        (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "tables.md").write_text(tables(report))
    if "steps" in report:
        from chaid_lab.bench.steps import plot

        plot(report["steps"], out / "step-curve.png")
    if "regime" in report:
        from chaid_lab.bench.steps import plot_paired

        plot_paired(report["regime"], out / "regime.png")
    if "quality" in report:
        plot_quality_vs_latency(report["quality"], out / "quality-vs-latency.png")
    if "hit_rates" in report:
        from chaid_lab.bench.cache import plot_hit_rates

        plot_hit_rates(report["hit_rates"], out / "hit-rate-vs-cache-size.png")
    return report


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


_PAIRED_NOTE = ("Differences are paired (same prompt, same seed): mean [95% bootstrap "
                "interval]; **win** or **loss** only when the interval excludes 0.")


def _paired(d: dict | None, digits: int = 3) -> str:
    from chaid_lab.stats import format_diff

    return format_diff(d, digits, markdown=True)


def tables(report: dict) -> str:
    """The Markdown tables of docs/results.md."""
    lines: list[str] = []
    if "steps" in report:
        from chaid_lab.bench import steps

        lines += [f"### The step curve ({report['steps']['pairs']} entity-sharing pairs)", "",
                  steps.tables(report["steps"]).replace("### ", "#### "), ""]
    if "regime" in report:
        from chaid_lab.bench import steps

        r = report["regime"]
        lines += [f"### The discriminating regime: guidance {r['config']['cfg_scale']}"
                  f" ({r['pairs']} pairs)", "",
                  steps.tables(r).replace("### ", "#### "), ""]
    if "defects" in report:
        from chaid_lab.shapes.defects import format_table

        lines += ["### " + format_table(report["defects"]), ""]
    if "quality" in report:
        lines += ["### Methods", "",
                  "| workload | method | steps | median ms | speedup vs full-30 | judge |"
                  " hit rate | PSNR to full-30 (dB) | judge − full-30 | judge − plain-N |"
                  " PSNR − plain-N |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in report["quality"]["methods"]:
            lines.append(
                f"| {m['workload']} | {m['name']} | {m['steps']} |"
                f" {m['latency_ms_median']:.0f} | {m['speedup_vs_full']:.2f}× |"
                f" {_fmt(m['judge'], '.3f')} | {_fmt(m['hit_rate'], '.2f')} |"
                f" {_fmt(m.get('psnr_vs_full'), '.2f')} | {_paired(m.get('vs_full_judge'))} |"
                f" {_paired(m.get('vs_plain_judge'))} | {_paired(m.get('vs_plain_psnr'), 2)} |")
        lines += ["", _PAIRED_NOTE, ""]
    if "ablation" in report:
        lines += ["### Ablation (all-hit pairs)", "",
                  "| setting | value | steps | judge | median ms | speedup | bytes per entry |"
                  " judge − full-30 | judge − plain-N | PSNR − plain-N |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["ablation"]["rows"]:
            lines.append(
                f"| {r['knob']} | {r['value']} | {r['steps']} | {r['judge']:.3f} |"
                f" {r['latency_ms_median']:.0f} | {r['speedup_vs_full']:.2f}× |"
                f" {r['bytes_per_entry']} | {_paired(r.get('vs_full_judge'))} |"
                f" {_paired(r.get('vs_plain_judge'))} | {_paired(r.get('vs_plain_psnr'), 2)} |")
        lines += ["", _PAIRED_NOTE, ""]
    if "hit_rates" in report:
        hr = report["hit_rates"]
        lines += [f"### Hit rate vs cache size ({hr['prompts']} Shapes prompts, LRU)", "",
                  "| entries | MB | entity matching | whole-prompt matching |", "|---|---|---|---|"]
        rows: dict[int, dict[str, float]] = {}
        mb: dict[int, float] = {}
        for r in hr["results"]:
            rows.setdefault(r["budget_entries"], {})[r["matching"]] = r["hit_rate"]
            mb[r["budget_entries"]] = r["budget_bytes"] / 1e6
        for n in sorted(rows):
            lines.append(f"| {n} | {mb[n]:.2f} | {_fmt(rows[n].get('entity'), '.3f')} |"
                         f" {_fmt(rows[n].get('prompt'), '.3f')} |")
        lines.append("")
    if "daemon" in report and report["daemon"].get("batch_curve"):
        curve = report["daemon"]["batch_curve"]
        lines += [f"### One guided step at batch B ({curve['device']}, {curve['threads']}"
                  " thread)", "", "| B | ms per step | ms per request | gain |"
                  " B hits end to end, ms | gain |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['ms_per_step']:.1f} | {r['ms_per_request_step']:.1f} |"
                  f" {r['gain']:.2f} | {r.get('hits_ms', 0):.0f} | {r.get('hits_gain', 0):.2f} |"
                  for r in curve["rows"]]
        lines.append("")
    if "daemon" in report:
        d = report["daemon"]
        lines += [f"### Daemon ({d['serve']} prompts after {d['warm']} warm-up)", "",
                  "| workers | clients | req/s | vs in-process | p50 ms | p99 ms | hit rate |"
                  " busy retries | ping p99 ms | slowest client's share |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        ref = d["in_process"]
        lines.append(f"| – | in process | {ref['throughput_rps']:.2f} | 1.00 |"
                     f" {ref['latency_ms']['p50']:.0f} | {ref['latency_ms']['p99']:.0f} |"
                     f" {ref['hit_rate']:.2f} | – | – | – |")
        for lv in d["levels"]:
            ping = (lv.get("ping_ms") or {}).get("p99")
            lines.append(f"| {lv.get('workers', 1)} | {lv['clients']} |"
                         f" {lv['throughput_rps']:.2f} | {lv['throughput_vs_in_process']:.2f} |"
                         f" {lv['latency_ms']['p50']:.0f} | {lv['latency_ms']['p99']:.0f} |"
                         f" {lv['hit_rate']:.2f} | {lv['busy_retries']} |"
                         f" {'–' if ping is None else f'{ping:.1f}'} |"
                         f" {_fmt(lv.get('slowest_share'), '.2f')} |")
        lines.append("")
    return "\n".join(lines)


# Smallest judge-score span of the quality plot's y-axis.
QUALITY_Y_SPAN = 0.05
# Where each method's label goes, in points from its marker.
_LABEL_OFFSETS = {"full-30": (4, 6), "plain-8": (4, 6), "chai-8": (4, -22),
                  "chai-8+intra": (4, -12)}


def plot_quality_vs_latency(quality: dict, path: Path) -> None:
    """Judge score against median latency, one marker per method, one panel per workload."""
    from chaid_lab.shapes.suite import _require_matplotlib

    plt = _require_matplotlib()
    workloads = sorted({m["workload"] for m in quality["methods"]})
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.2 * len(workloads), 4.0),
                             squeeze=False)
    markers = {"full-30": "s", "plain-8": "v", "nirvana-vid": "D", "intra-fbc": "^",
               "chai-8": "*", "chai-8+intra": "P"}
    for ax, workload in zip(axes[0], workloads, strict=True):
        for m in quality["methods"]:
            if m["workload"] != workload or m["judge"] is None:
                continue
            ax.scatter(m["latency_ms_median"], m["judge"], s=90 if "chai" in m["name"] else 50,
                       marker=markers.get(m["name"], "o"), label=m["name"])
            # methods that land on one another (plain-8 and CHAI, CHAI with and without
            # the intra cache, full-30 and a NIRVANA-VID that never hit) get their labels
            # on different sides
            ax.annotate(m["name"], (m["latency_ms_median"], m["judge"]), fontsize=7,
                        xytext=_LABEL_OFFSETS.get(m["name"], (4, -10)),
                        textcoords="offset points")
        ax.set_xlabel("median end-to-end latency (ms)")
        ax.set_ylabel("judge score")
        # At least QUALITY_Y_SPAN of judge score on the axis: the methods differ by a few
        # thousandths, within their paired intervals, which a tight axis shows as gaps.
        scores = [m["judge"] for m in quality["methods"]
                  if m["workload"] == workload and m["judge"] is not None]
        if scores:
            middle = (max(scores) + min(scores)) / 2
            half = max(QUALITY_Y_SPAN, max(scores) - min(scores)) / 2 * 1.1
            ax.set_ylim(middle - half, middle + half)
        ax.set_title(f"{workload} workload (paired intervals: docs/results.md)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def command(args: Any) -> int:
    """``chaid-lab bench report`` (parsed in chaid_lab.bench.cli)."""
    from chaid.checks import check_int
    from chaid.errors import ChaidError

    parts = tuple(p for p in args.parts.split(",") if p) if args.parts else tuple(PARTS)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ChaidError(f"unknown parts {sorted(unknown)} (known: {', '.join(PARTS)})")
    check_int("--threads", args.threads, 1, 256, ChaidError)
    from chaid_lab.shapes.suite import _require_matplotlib

    _require_matplotlib()  # fail before the long run, not after it
    logging.getLogger("chaid").setLevel(logging.WARNING)
    cfg = ReportConfig(quick=args.quick, model=args.model, threads=args.threads, seed=args.seed)
    t0 = time.perf_counter()
    report = run_report(cfg, args.out, parts)
    print(tables(report))
    print(f"wrote {args.out}/ in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0
