"""``chaid-lab bench matching``: does a store hit where it should and miss where it should?

Natural prompt triples (``data/match_pairs.json``): a cached prompt, a prompt that shares an
object or a scene with it in other words (should hit that entry), and a prompt that shares
nothing with any cached prompt (should miss). Every cached prompt goes into one real store;
then each hit and miss prompt is looked up. Precision is the share of hits that found the
right entry; recall the share of should-hit prompts that did; a should-miss prompt that
hits, or a should-hit prompt that hits another entry, is a false hit.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from chaid.store.analysis import Analyzer
from chaid.store.cache import LatentCache
from chaid.store.settings import StoreSettings

PAIRS_FILE = Path(__file__).resolve().parent / "data" / "match_pairs.json"
SHAPE = (1, 1, 2, 2)
FINGERPRINT = "matching"


def load_triples(path: Path = PAIRS_FILE) -> list[dict[str, str]]:
    return json.loads(Path(path).read_text())["triples"]


def evaluate(analyzer: Analyzer, settings: StoreSettings,
             triples: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Precision and recall of entity matching on ``triples`` with this analyzer."""
    triples = triples if triples is not None else load_triples()
    latents = {2: np.zeros(SHAPE, np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        store = dataclasses.replace(settings, data_dir=Path(tmp) / "store",
                                    map_bytes=1 << 22)
        with LatentCache.open(store, analyzer) as cache:
            ids = [cache.insert(t["cached"], latents, FINGERPRINT).entry_id for t in triples]
            rows = []
            for t, entry_id in zip(triples, ids, strict=True):
                hit = cache.lookup(t["hit"], FINGERPRINT, SHAPE, touch=False)
                miss = cache.lookup(t["miss"], FINGERPRINT, SHAPE, touch=False)
                rows.append({"cached": t["cached"], "hit": t["hit"], "miss": t["miss"],
                             "hit_found": hit.entry_id if hit.hit else None,
                             "right": hit.hit and hit.entry_id == entry_id,
                             "miss_hit": miss.hit})
    right = sum(r["right"] for r in rows)
    hits = sum(r["hit_found"] is not None for r in rows) + sum(r["miss_hit"] for r in rows)
    return {
        "embedder": analyzer.embedder.name,
        "threshold": settings.threshold,
        "triples": len(rows),
        "precision": round(right / hits, 4) if hits else 1.0,
        "recall": round(right / len(rows), 4),
        "false_hits_on_miss_prompts": sum(r["miss_hit"] for r in rows),
        "wrong_entry_hits": sum(r["hit_found"] is not None and not r["right"] for r in rows),
        "rows": rows,
    }
