"""Cache Attention: queries from the current tokens, keys/values from cached tokens.

:func:`cache_attention` is the one entry point. ``backend="auto"`` takes the CuPy kernel
for CUDA tensors it supports when CuPy and a device are present, and the torch reference
otherwise; ``"reference"`` and ``"cupy"`` force one (forcing ``"cupy"`` where it cannot run
is an error, not a silent fallback).
"""

from __future__ import annotations

import torch

from chaid.errors import ChaidError
from chaid.kernels import cuda
from chaid.kernels.reference import cache_attention_reference, check_inputs

BACKENDS = ("auto", "reference", "cupy")


def select_backend(q: torch.Tensor, k: torch.Tensor, backend: str = "auto") -> str:
    """The backend that :func:`cache_attention` would use for these inputs."""
    if backend not in BACKENDS:
        raise ChaidError(
            f"unknown Cache Attention backend {backend!r} (known: {', '.join(BACKENDS)})"
        )
    if backend != "auto":
        return backend
    return "cupy" if cuda.supports(q, k) and cuda.availability()[0] else "reference"


def cache_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) v for q (N, nh, Lq, D) and k, v (N, nh, Lk, D).

    InputError when the three do not fit together (whichever the backend).
    """
    check_inputs(q, k, v)
    if select_backend(q, k, backend) == "cupy":
        return cuda.cache_attention_cupy(q, k, v)
    return cache_attention_reference(q, k, v)


__all__ = ["BACKENDS", "cache_attention", "cache_attention_reference", "select_backend"]
