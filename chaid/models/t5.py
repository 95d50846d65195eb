"""T5 text encoder of OpenSora 1.2 (T5-XXL v1.1, 4096-d states), from a local directory.

The directory is a Hugging Face snapshot of ``DeepFloyd/t5-v1_1-xxl``: ``config.json``, the
weights (safetensors or PyTorch shards, with their index) and the SentencePiece tokenizer
(``spiece.model`` and/or ``tokenizer.json``, ``tokenizer_config.json``). chaid never
downloads it; see docs/opensora.md.

Each prompt is prepared as OpenSora prepares it before T5: the aesthetic-score suffix is
appended, then the text is cleaned (:func:`clean_prompt`). Tokens are padded to
``max_length`` (300) with the end token included; the mask marks real tokens.
"""

from __future__ import annotations

import html
import json
import re
import threading
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import torch

from chaid.errors import WeightsError
from chaid.models.text import TextEmbedding

# OpenSora 1.2 conditions on an aesthetic score appended to the prompt; 6.5 is what its
# inference config asks for (high-aesthetic videos in training scored about that).
DEFAULT_AESTHETIC_SCORE = 6.5
# Caption tokens of OpenSora 1.2 (its DiT's model_max_length).
MAX_LENGTH = 300
# What to do with the model after each encode: stay on its device; move to the CPU until the
# next call (frees GPU memory, costs a copy per call); or drop it and reload from disk on the
# next call (frees all memory, costs a load per call).
AFTER_ENCODE = ("keep", "offload", "free")
# Files that hold T5 weights in a Hugging Face snapshot (one of them must exist).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Files from which transformers can build the T5 tokenizer (one of them must exist).
TOKENIZER_FILES = ("spiece.model", "tokenizer.json")

_URL = re.compile(r"\b(?:https?://|www\.)\S+|\b[\w.-]+\.(?:com|net|org|io|co|ru|cn)(?:/\S*)?\b")
_TAG = re.compile(r"<[^>]+>")
_MENTION = re.compile(r"@[\w\d]+\b")
_DASHES = re.compile(r"[\u2010-\u2015\u2212\u2e3a\u2e3b\ufe58\ufe63\uff0d]+")
_DOUBLE_QUOTES = re.compile(r"[\u201c\u201d\u201e\u00ab\u00bb\u300c\u300d]")
_SINGLE_QUOTES = re.compile(r"[\u2018\u2019\u201a`\u00b4]")
_SPACE = re.compile(r"\s+")


def _clean_once(text: str) -> str:
    text = urllib.parse.unquote_plus(str(text)).strip().lower()
    text = text.replace("<person>", "person")
    # 1. links and markup
    text = _URL.sub("", text)
    text = _TAG.sub(" ", html.unescape(text))
    text = _MENTION.sub("", text)
    # 2. one form of dashes and quotes
    text = _DASHES.sub("-", text)
    text = _DOUBLE_QUOTES.sub('"', text)
    text = _SINGLE_QUOTES.sub("'", text)
    # 3. whitespace
    return _SPACE.sub(" ", text).strip()


def clean_prompt(text: str) -> str:
    """OpenSora's caption cleaning (applied twice, as in training): URL-decoding,
    lower-case, links, HTML tags and entities and @mentions removed, dashes and quotes
    unified, whitespace collapsed. It keeps the rules that change ordinary prompts; the
    training pipeline's rarer ones (file names, IP addresses, shop boilerplate) are left
    out."""
    return _clean_once(_clean_once(text))


def prepare_prompt(text: str, aesthetic_score: float | None = DEFAULT_AESTHETIC_SCORE) -> str:
    """The text T5 sees: the aesthetic-score suffix appended, then cleaned."""
    if aesthetic_score is not None:
        text = f"{text} aesthetic score: {aesthetic_score:.1f}."
    return clean_prompt(text)


def read_t5_config(path: Path) -> dict:
    """config.json of a T5 directory; WeightsError if absent, unreadable or not T5."""
    file = path / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read the T5 config {file}: {exc}") from None
    if config.get("model_type") != "t5" or not isinstance(config.get("d_model"), int):
        raise WeightsError(f"{file} is not a T5 config (model_type {config.get('model_type')!r})")
    return config


class T5TextEncoder:
    """A T5 encoder's last hidden states for OpenSora prompts.

    The model loads on the first ``encode`` (or ``load()``), from local files only, on
    ``device`` in ``dtype``. OpenSora runs T5 in fp32 (about 19 GB for XXL); bf16 halves
    that. ``after_encode`` chooses what happens to the model between calls (see
    AFTER_ENCODE). States are returned on the CPU in fp32, with padded positions as T5
    computed them (the DiT masks them out).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_length: int = MAX_LENGTH,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        after_encode: str = "keep",
        aesthetic_score: float | None = DEFAULT_AESTHETIC_SCORE,
    ) -> None:
        if after_encode not in AFTER_ENCODE:
            raise ValueError(f"after_encode must be one of {AFTER_ENCODE}, not {after_encode!r}")
        self.path = Path(path).expanduser()
        self.config = read_t5_config(self.path)
        self.name = f"t5-{self.config.get('d_model')}"
        self.dim = int(self.config["d_model"])
        self.max_length = max_length
        self.device = torch.device(device)
        self.dtype = dtype
        self.after_encode = after_encode
        self.aesthetic_score = aesthetic_score
        self._tokenizer = None
        self._model = None
        # One encode at a time: offloading moves the model under the caller's feet.
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load tokenizer and model now (T5-XXL takes tens of seconds); a server calls this
        before it reports ready."""
        with self._lock:
            self._ensure_loaded()

    def _ensure_loaded(self) -> None:
        # Imported here: transformers takes seconds to import.
        from transformers import AutoTokenizer, T5EncoderModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        if self._tokenizer is None:
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise WeightsError(
                    f"cannot load the T5 tokenizer from {self.path}: {exc}"
                ) from None
        if self._model is None:
            try:
                model = T5EncoderModel.from_pretrained(
                    self.path, local_files_only=True, dtype=self.dtype
                )
            except (OSError, ValueError) as exc:
                raise WeightsError(f"cannot load T5 from {self.path}: {exc}") from None
            self._model = model.eval().requires_grad_(False)
        self._model.to(self.device)

    def release(self) -> None:
        """Drop the model (the next encode reloads it)."""
        with self._lock:
            self._model = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        texts = [prepare_prompt(p, self.aesthetic_score) for p in prompts]
        with self._lock:
            self._ensure_loaded()
            tokens = self._tokenizer(
                texts,
                max_length=self.max_length,
                padding="max_length",
                truncation=True,
                add_special_tokens=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
            try:
                with torch.inference_mode():
                    states = self._model(
                        input_ids=tokens["input_ids"].to(self.device),
                        attention_mask=tokens["attention_mask"].to(self.device),
                    ).last_hidden_state  # (B, L, d_model)
                states = states.float().cpu()
            finally:
                if self.after_encode == "offload":
                    self._model.to("cpu")
                elif self.after_encode == "free":
                    self._model = None
        return TextEmbedding(states, tokens["attention_mask"].bool())
