"""``chaid-lab bench cache``: hit rates of a prompt stream, lookup latency and index recall.

1. Hit rates: the prompts, in a seeded random order, replay through lookup + insert (a miss
   writes an entry whose latents total ``payload_bytes``; a hit writes nothing, as in the
   daemon) for every budget x policy x matcher.
2. Latency: stores of 1k / 10k / 100k synthetic entries (entities recombined from the
   prompts' own modifiers and head nouns, so the index holds real-language vectors), then
   end-to-end lookups of the real prompts: entity extraction, embedding, search, scoring.
3. Recall: at each size, recall@1 of the Annoy index against brute force for a sweep of
   ``search_k``, with the prompts' entities as queries.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from chaid.store.analysis import Analyzer, PromptAnalysis
from chaid.store.cache import LatentCache
from chaid.store.settings import StoreSettings

log = logging.getLogger(__name__)

FINGERPRINT = "bench"
LATENT_STEPS = (2, 3, 4)
# Budgets are counted in entries of this many bytes of vectors beside the payload.
VECTOR_ALLOWANCE = 8 << 10
# search_k values of the recall sweep.
SEARCH_K_SWEEP = (500, 1000, 2000, 4000, 8000, 16000, 32000)
# Payload of the latency stores: the lookup never reads latents, so size does not matter.
LATENCY_PAYLOAD = 96
# Keys of LookupResult.timings_ms broken down in the latency report: spaCy, the embedding
# forward (entities and prompt), Annoy searches + scoring + tie-break + record read, the
# tie-break's own part, and the prompt-only forward a tie needs when the entities were
# memoised.
LOOKUP_STAGES = ("entities", "embed", "search", "pick", "embed_prompt", "total")


def load_prompts(path: Path) -> list[str]:
    """Prompts from a JSON list (strings, or objects with "prompt" or "prompt_en") or a text
    file with one prompt per line."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [line.strip() for line in text.splitlines() if line.strip()]
    out = []
    for item in data:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            out.append(item.get("prompt") or item.get("prompt_en") or item.get("text"))
    return [p for p in out if p]


def _latents(payload_bytes: int) -> dict[int, np.ndarray]:
    per_step = max(1, payload_bytes // (2 * len(LATENT_STEPS)))  # float16 elements
    rng = np.random.default_rng(0)
    return {s: rng.standard_normal(per_step).astype(np.float16) for s in LATENT_STEPS}


class _Tick:
    """A logical clock: every call is one unit later (reproducible LRU order)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def replay(
    analyses: Sequence[PromptAnalysis],
    settings: StoreSettings,
    analyzer: Analyzer,
    payload_bytes: int,
    matching: str,
) -> dict:
    """Replay the stream once through a fresh store; return counts and the hit rate."""
    latents = _latents(payload_bytes)
    shape = next(iter(latents.values())).shape
    hits = evictions = 0
    shutil.rmtree(settings.data_dir, ignore_errors=True)
    cache = LatentCache(settings, embedder=(analyzer.embedder.name, analyzer.embedder.dim),
                        analyzer=analyzer, clock=_Tick())
    try:
        for analysis in analyses:
            result = cache.lookup(analysis, FINGERPRINT, shape, matching=matching)
            if result.hit:
                hits += 1
            else:
                evictions += len(cache.insert(analysis, latents, FINGERPRINT).evicted)
        entries = len(cache)
    finally:
        cache.close()
        shutil.rmtree(settings.data_dir, ignore_errors=True)
    return {"requests": len(analyses), "hits": hits, "hit_rate": hits / len(analyses),
            "evictions": evictions, "entries_at_end": entries}


def synthetic_entities(analyses: Sequence[PromptAnalysis], count: int,
                       rng: np.random.Generator) -> list[str]:
    """Up to ``count`` distinct entity strings recombined from the prompts' entities:
    each is a modifier seen in some entity followed by a head noun seen in another."""
    heads, modifiers = set(), set()
    for a in analyses:
        for entity in a.entities:
            words = entity.split()
            heads.add(words[-1])
            modifiers.update(words[:-1])
    heads_l, mods_l = sorted(heads), sorted(modifiers)
    seen = {e for a in analyses for e in a.entities}
    out = list(seen)[:count]
    total = len(heads_l) * len(mods_l)
    for flat in rng.permutation(total):
        if len(out) >= count:
            break
        text = f"{mods_l[flat % len(mods_l)]} {heads_l[flat // len(mods_l)]}"
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _percentiles(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples)
    return {"p50": round(float(np.percentile(arr, 50)), 3),
            "p99": round(float(np.percentile(arr, 99)), 3),
            "mean": round(float(arr.mean()), 3)}


def latency_and_recall(
    analyses: Sequence[PromptAnalysis],
    analyzer: Analyzer,
    base: StoreSettings,
    size: int,
    queries: Sequence[str],
    pool_vectors: np.ndarray,
    rng: np.random.Generator,
) -> dict:
    """Fill a store with ``size`` synthetic entries; time real lookups; measure recall."""
    settings = dataclasses.replace(base, rebuild_every=10**9, budget_bytes=1 << 40)
    shutil.rmtree(settings.data_dir, ignore_errors=True)
    latents = _latents(LATENCY_PAYLOAD)
    shape = next(iter(latents.values())).shape
    cache = LatentCache(settings, embedder=(analyzer.embedder.name, analyzer.embedder.dim),
                        analyzer=analyzer)
    try:
        t0 = time.perf_counter()
        for i in range(size):
            picks = rng.choice(len(pool_vectors), size=int(rng.integers(1, 5)), replace=False)
            vecs = pool_vectors[picks]
            pvec = vecs.sum(0)
            pvec /= np.linalg.norm(pvec)
            analysis = PromptAnalysis(f"synthetic prompt {i}",
                                      tuple(f"e{p}" for p in picks), vecs, pvec)
            cache.insert(analysis, latents, FINGERPRINT)
        fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache.rebuild_index()
        build_s = time.perf_counter() - t0
        # Cold: nothing memoised (every prompt is parsed, every entity and prompt embedded);
        # warm: the same prompts again, as a daemon sees a repeat (its analysis memoised).
        analyzer.forget()
        cold: list[dict[str, float]] = []
        warm: list[dict[str, float]] = []
        hits = 0
        for prompt in queries:
            res = cache.lookup(prompt, FINGERPRINT, shape, touch=False)
            cold.append(res.timings_ms)
            hits += res.hit
        for prompt in queries:
            warm.append(cache.lookup(prompt, FINGERPRINT, shape, touch=False).timings_ms)
        recall = _recall(cache, analyses)
        items = cache.index.built_size
        files_mb = _file_sizes_mb(Path(settings.data_dir))
    finally:
        cache.close()
        shutil.rmtree(settings.data_dir, ignore_errors=True)
    return {
        "entries": size, "items": items, "fill_s": round(fill_s, 2),
        "index_build_s": round(build_s, 2), "queries": len(queries),
        "query_hit_rate": round(hits / len(queries), 4),
        "lookup_ms_cold": _percentiles([t["total"] for t in cold]),
        "lookup_ms_warm": _percentiles([t["total"] for t in warm]),
        "stages_ms_cold": _stages(cold), "stages_ms_warm": _stages(warm),
        "recall_at_1": recall,
        "files_mb": files_mb,
        # the process's peak resident memory so far (the largest store's when sizes grow)
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _file_sizes_mb(data_dir: Path) -> dict[str, float]:
    """Bytes on disk of the store's LMDB file and of its index files, in MB."""
    out = {}
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and path.stat().st_blocks:
            name = "index" if path.name.startswith("index-") else path.name
            out[name] = round(out.get(name, 0.0) + path.stat().st_blocks * 512 / 1e6, 1)
    return out


def _stages(timings: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """p50 and mean of each lookup stage (a stage a lookup skipped counts as 0 ms) and the
    share of lookups that ran it."""
    out = {}
    for stage in LOOKUP_STAGES:
        values = np.asarray([t.get(stage, 0.0) for t in timings])
        out[stage] = {"p50": round(float(np.percentile(values, 50)), 3),
                      "mean": round(float(values.mean()), 3),
                      "ran": round(sum(stage in t for t in timings) / len(timings), 3)}
    return out


def _recall(cache: LatentCache, analyses: Sequence[PromptAnalysis]) -> dict[str, float]:
    """recall@1 of the index per search_k: the top result's cosine equals the exact best."""
    matrix = np.stack([cache.index.built_vector(i) for i in range(cache.index.built_size)])
    queries = {e: v for a in analyses for e, v in zip(a.entities, a.entity_vectors,
                                                         strict=True)}
    qmat = np.stack(list(queries.values()))
    exact = (qmat @ matrix.T).max(axis=1)
    out = {}
    for search_k in SEARCH_K_SWEEP:
        found = 0
        for q, best in zip(qmat, exact, strict=True):
            top = cache.index.search(q, 1, search_k=search_k)
            found += bool(top) and top[0].cosine >= best - 1e-5
        out[str(search_k)] = round(found / len(qmat), 4)
    return out


def run_cache_bench(
    prompts: Sequence[str],
    analyzer: Analyzer,
    *,
    payload_bytes: int = 1_300_000,
    budget_entries: Sequence[int] = (10, 25, 50, 100, 250),
    policies: Sequence[str] = ("lru", "lfu", "fifo", "lcbfu"),
    matchers: Sequence[str] = ("entity", "prompt"),
    sizes: Sequence[int] = (1000, 10_000, 100_000),
    latency_queries: int = 200,
    seed: int = 0,
    work_dir: Path | None = None,
    base: StoreSettings | None = None,
) -> dict:
    """Run the three parts; return the JSON-ready report."""
    base = base or StoreSettings()
    rng = np.random.default_rng(seed)
    own_dir = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="chaid-bench-")) if own_dir else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        order = [prompts[i] for i in rng.permutation(len(prompts))]
        analyses = analyzer.analyse_many(order)
        analyse_s = time.perf_counter() - t0
        base = dataclasses.replace(base, data_dir=work / "store", durable=False)
        results = []
        for matching in matchers:
            for budget in budget_entries:
                budget_bytes = budget * (payload_bytes + VECTOR_ALLOWANCE)
                for policy in policies:
                    settings = dataclasses.replace(base, policy=policy,
                                                   budget_bytes=budget_bytes)
                    t1 = time.perf_counter()
                    row = replay(analyses, settings, analyzer, payload_bytes, matching)
                    row.update(matching=matching, policy=policy, budget_bytes=budget_bytes,
                               budget_entries=budget, seconds=round(time.perf_counter() - t1, 2))
                    log.info("%s", row)
                    results.append(row)
        latency = []
        if sizes:
            pool = synthetic_entities(analyses, max(sizes), rng)
            t1 = time.perf_counter()
            pool_vectors = analyzer.embedder.embed_uncached(pool, batch_size=256)
            pool_s = time.perf_counter() - t1
            queries = [a.prompt for a in analyses[:latency_queries]]
            for size in sizes:
                row = latency_and_recall(analyses, analyzer, base, size, queries,
                                         pool_vectors, rng)
                log.info("%s", row)
                latency.append(row)
        largest = latency[-1] if latency else None
        return {
            "prompts": len(prompts),
            "payload_bytes": payload_bytes,
            "entity_threshold": base.threshold,
            "embedder": base.embedder,
            "prompt_threshold": base.prompt_threshold,
            "search_k": base.search_k,
            "index_trees": base.index_trees,
            "embedder_precision": analyzer.embedder.precision,
            "embedder_packs": analyzer.embedder.packs,
            "analyse_seconds": round(analyse_s, 2),
            "results": results,
            "lookup_ms": ({"entries": largest["entries"], **largest["lookup_ms_cold"],
                           "warm": largest["lookup_ms_warm"]} if largest else None),
            "latency": latency,
            "synthetic_entities": len(pool) if sizes else 0,
            "synthetic_embed_seconds": round(pool_s, 2) if sizes else 0,
        }
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)


def _size(nbytes: float) -> str:
    """12288 → "12.3 kB", 2048000 → "2.05 MB": three significant digits, a unit that fits."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def plot_hit_rates(report: dict, path: Path) -> None:
    """Hit rate against budget, one line per matcher and policy, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        from chaid.store.errors import StoreError

        raise StoreError("--plot needs matplotlib (pip install matplotlib)") from exc
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in report["results"]:
        key = (row["matching"], row["policy"])
        lines.setdefault(key, []).append((row["budget_bytes"] / 1e6, row["hit_rate"]))
    for (matching, policy), points in sorted(lines.items()):
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", linestyle="-" if matching == "entity" else "--",
                label=f"{matching} / {policy}")
    ax.set_xscale("log")
    # Ticks at the measured budgets, labelled in plain MB (log-scale defaults read "3x10^1").
    budgets_mb = sorted({x for points in lines.values() for x, _ in points})
    ax.set_xticks(budgets_mb, [f"{mb:.3g}" for mb in budgets_mb])
    ax.minorticks_off()
    ax.set_xlabel("cache budget (MB)")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['prompts']} prompts, {_size(report['payload_bytes'])} of latents "
                 f"per entry")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
