"""Typed results of the daemon's methods."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EntityMatch:
    query: str  # entity of the new prompt
    # Entity of the cached prompt it matched; None when the daemon keeps other users'
    # prompts private (server.share_prompts = false) and the entry is not yours.
    cached: str | None
    cosine: float


@dataclass(frozen=True)
class Match:
    """The cache entry a hit reused, and why."""

    entry_id: int
    prompt: str | None  # None: another user's entry, kept private by the daemon
    score: float
    entities: list[EntityMatch]

    @classmethod
    def from_wire(cls, d: dict[str, Any] | None) -> Match | None:
        if d is None:
            return None
        return cls(d["entry_id"], d["prompt"], d["score"],
                   [EntityMatch(e["query"], e["cached"], e["cosine"]) for e in d["entities"]])


@dataclass(frozen=True)
class GenerateResult:
    """A generated video and how it was made.

    ``video`` is MP4 bytes (format "mp4") or a (frames, height, width, 3) uint8 array
    (format "frames"; a numpy array when numpy is installed). ``cache`` is "hit", "miss"
    or "off"; ``mode`` how the model ran ("full", "fast" or "plain"); ``timings`` holds
    at least ``total_ms`` (daemon side) and ``client_total_ms`` (round trip as the client
    saw it). ``understood`` is what the model could use of the prompt, for a model with a
    closed vocabulary: ``{"known": [...], "unknown": [...], "drawable": bool}``.
    """

    video: Any
    format: str
    cache: str
    steps: int
    frames: int
    height: int
    width: int
    fps: int
    seed: int
    matched: Match | None
    timings: dict[str, float]
    entities: list[str] | None = None
    inserted: dict[str, Any] | None = None
    # Why a miss's latents were not cached (the daemon's store could not write them).
    not_cached: str | None = None
    mode: str | None = None
    prompt: str | None = None
    understood: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wire(cls, d: dict[str, Any], client_ms: float) -> GenerateResult:
        timings = dict(d.get("timings") or {})
        timings["client_total_ms"] = round(client_ms, 2)
        return cls(
            video=d["video"], format=d["format"], cache=d["cache"], steps=d["steps"],
            frames=d["frames"], height=d["height"], width=d["width"], fps=d["fps"],
            seed=d["seed"], matched=Match.from_wire(d.get("matched")), timings=timings,
            entities=d.get("entities"), inserted=d.get("inserted"),
            not_cached=d.get("not_cached"), mode=d.get("mode"), prompt=d.get("prompt"),
            understood=d.get("understood"), raw={k: v for k, v in d.items() if k != "video"},
        )

    def summary(self) -> dict[str, Any]:
        """Everything but the video, as plain JSON-able data (what `chai --json` prints)."""
        matched = None
        if self.matched is not None:
            matched = {"entry_id": self.matched.entry_id, "prompt": self.matched.prompt,
                       "score": self.matched.score,
                       "entities": [{"query": e.query, "cached": e.cached, "cosine": e.cosine}
                                    for e in self.matched.entities]}
        return {"cache": self.cache, "mode": self.mode, "steps": self.steps, "matched": matched,
                "frames": self.frames, "height": self.height, "width": self.width,
                "fps": self.fps, "seed": self.seed, "entities": self.entities,
                "inserted": self.inserted, "not_cached": self.not_cached,
                "understood": self.understood, "timings": self.timings}


@dataclass(frozen=True)
class LookupResult:
    """A dry-run lookup: would this prompt hit, which entry, and which entities matched."""

    hit: bool
    entry_id: int | None
    cached_prompt: str | None
    score: float
    entities: list[str]
    matches: list[EntityMatch]
    threshold: float
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    # What the model could use of the prompt (see GenerateResult.understood).
    understood: dict[str, Any] | None = None

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> LookupResult:
        return cls(d["hit"], d.get("entry_id"), d.get("cached_prompt"), d.get("score", 0.0),
                   list(d.get("entities") or []),
                   [EntityMatch(m["query"], m["cached"], m["cosine"]) for m in d["matches"]],
                   d.get("threshold", 0.0), raw=d, understood=d.get("understood"))
