"""Calibration of the entity threshold on real prompts.

Method: take every distinct entity of a prompt set, label each pair of distinct entities
"same thing" when spaCy gives them the same head-noun lemma ("red fox" / "fox",
"coastal beach" / "sandy beach") and "different" otherwise, and sweep the cosine threshold.
For each threshold we count the pairs at or above it (predicted matches) and report
precision, recall and F-beta against those labels. The chosen threshold maximises F0.5:
a false hit steers a video with the wrong entity's latents (a visible error) while a false
miss only costs the speed-up, so precision weighs twice as much as recall.

The labels are conservative: synonyms with different heads ("sofa" / "couch") count as
different, so the measured precision is a lower bound.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chaid.store.analysis import Analyzer

# Precision weighs 1/BETA times as much as recall in F-beta.
BETA = 0.5
SWEEP = np.round(np.arange(0.40, 0.96, 0.01), 2)


def calibrate_threshold(prompts: Sequence[str], analyzer: Analyzer) -> dict:
    """Sweep thresholds over the entity pairs of ``prompts``; return the table and the pick."""
    heads: dict[str, str] = {}
    for prompt in prompts:
        for entity, head in analyzer.extractor.heads(prompt):
            heads.setdefault(entity, head)
    entities = sorted(heads)
    vectors = analyzer.embedder.embed_uncached(entities)
    cos = vectors @ vectors.T
    head_ids = np.unique([heads[e] for e in entities], return_inverse=True)[1]
    same = head_ids[:, None] == head_ids[None, :]
    upper = np.triu(np.ones_like(same, dtype=bool), k=1)  # each unordered pair once
    pair_cos, pair_same = cos[upper], same[upper]
    positives = int(pair_same.sum())
    rows = []
    for t in SWEEP:
        predicted = pair_cos >= t
        tp = int((predicted & pair_same).sum())
        fp = int((predicted & ~pair_same).sum())
        precision = tp / (tp + fp) if tp + fp else 1.0
        recall = tp / positives if positives else 0.0
        b2 = BETA * BETA
        f_beta = ((1 + b2) * precision * recall / (b2 * precision + recall)
                  if precision + recall else 0.0)
        rows.append({"threshold": float(t), "precision": round(precision, 4),
                     "recall": round(recall, 4), "f_beta": round(f_beta, 4),
                     "predicted_pairs": tp + fp})
    best = max(rows, key=lambda r: r["f_beta"])
    return {
        "method": "same head-noun lemma = same entity; maximise F0.5 over pairs",
        "prompts": len(prompts),
        "entities": len(entities),
        "pairs": int(upper.sum()),
        "positive_pairs": positives,
        "beta": BETA,
        "threshold": best["threshold"],
        "at_threshold": best,
        "sweep": rows,
    }
