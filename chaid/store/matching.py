"""Scoring of lookup candidates and the explainable lookup result.

Entity matching (the daemon's): each entity of the new prompt brings its nearest cached
entities; an entry's score is the sum, over the new prompt's entities, of that entry's best
cosine at or above the threshold. The highest-scoring eligible entry wins; equal scores are
decided by whole-prompt cosine, then by the older entry. Whole-prompt matching (NIRVANA's,
for the benchmark) compares prompt vectors alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

# Scores closer than this are a tie (float32 dot products differ in the last bits).
SCORE_TIE = 1e-5


@dataclass(frozen=True)
class EntityMatch:
    """One entity of the new prompt and the cached entity it matched."""

    query_entity: str
    cached_entity: str
    cosine: float


@dataclass
class LookupResult:
    """What a lookup found and why: enough to explain a hit or a miss to a user."""

    hit: bool
    matching: str  # "entity" or "prompt"
    entry_id: int | None = None
    score: float = 0.0  # entity: sum of matched cosines; prompt: the prompt cosine
    prompt_cosine: float | None = None
    cached_prompt: str | None = None
    entities: tuple[str, ...] = ()
    matches: list[EntityMatch] = field(default_factory=list)
    candidates: int = 0  # eligible entries that scored above zero
    threshold: float = 0.0
    timings_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["entities"] = list(self.entities)
        return out


@dataclass
class Candidate:
    entry_id: int
    # query entity position -> (cosine, cached entity position)
    best: dict[int, tuple[float, int]] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return sum(c for c, _ in self.best.values())


def collect_candidates(
    neighbors_per_entity: Iterable[Iterable[tuple[int, int, float]]],
    threshold: float,
    eligible: Callable[[int], bool],
) -> dict[int, Candidate]:
    """Entries with at least one entity at or above ``threshold``, with their best matches.

    ``neighbors_per_entity[i]`` lists ``(entry id, cached entity position, cosine)`` near the
    new prompt's entity ``i``.
    """
    out: dict[int, Candidate] = {}
    verdict: dict[int, bool] = {}
    for query_pos, neighbors in enumerate(neighbors_per_entity):
        for entry_id, cached_pos, cosine in neighbors:
            if cosine < threshold:
                continue
            ok = verdict.get(entry_id)
            if ok is None:
                ok = verdict[entry_id] = eligible(entry_id)
            if not ok:
                continue
            cand = out.setdefault(entry_id, Candidate(entry_id))
            prev = cand.best.get(query_pos)
            if prev is None or cosine > prev[0]:
                cand.best[query_pos] = (cosine, cached_pos)
    return out


def pick_winner(
    candidates: dict[int, Candidate],
    prompt_cosine: Callable[[list[int]], dict[int, float]],
) -> tuple[Candidate | None, float | None]:
    """The best-scoring candidate; ties go to the higher whole-prompt cosine, then the older.

    ``prompt_cosine(entry ids)`` is asked only when there is a tie.
    """
    if not candidates:
        return None, None
    best_score = max(c.score for c in candidates.values())
    tied = sorted(e for e, c in candidates.items() if best_score - c.score <= SCORE_TIE)
    if len(tied) == 1:
        return candidates[tied[0]], None
    cosines = prompt_cosine(tied)
    winner = max(tied, key=lambda e: (cosines.get(e, -1.0), -e))
    return candidates[winner], cosines.get(winner)
