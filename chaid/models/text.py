"""Text encoders: prompt → per-token states and a padding mask for the DiT's cross-attention.

Every encoder has the same small interface (:class:`TextEncoder`). The null caption used
for classifier-free guidance is not the encoder's: it is a learned buffer of the DiT.
"""

from __future__ import annotations

import hashlib
import math
import re
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
