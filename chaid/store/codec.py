"""Latent codecs: how a latent becomes the bytes an entry stores, and back.

An entry's latents share one shape and one stored dtype (``store.latent_dtype``): float32
and float16 are raw C-ordered arrays; int8 is symmetric quantisation with one float32 scale
per slice of the two leading axes (see :func:`quantise_int8`). Every stored latent carries
a checksum of its bytes in the entry's record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from chaid.store.errors import StoreError
from chaid.store.settings import LATENT_DTYPES


def as_numpy(latent: Any) -> np.ndarray:
    """A latent as a C-ordered numpy array; accepts numpy arrays and torch tensors (any
    device, bfloat16 included) without importing torch."""
    if isinstance(latent, np.ndarray):
        return np.ascontiguousarray(latent)
    if hasattr(latent, "detach"):  # a torch tensor
        t = latent.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            t = t.float()
        return np.ascontiguousarray(t.numpy())
    raise StoreError(f"a latent must be a numpy array or a torch tensor, not {type(latent)}")


def quantise_int8(x: np.ndarray) -> np.ndarray:
    """A latent as packed int8 bytes (uint8 view): fp32 scales, then the int8 values.

    Symmetric quantisation with one scale per slice of the two leading axes (a latent
    (C, T, H, W) gets one per channel and frame): latents vary far more across channels
    than within one frame of one channel. Every value is within half a step of its scale.
    """
    x = np.asarray(x, np.float32)
    if x.ndim < 3:
        raise StoreError(f"int8 storage needs latents of 3 or more axes, not {x.shape}")
    axes = tuple(range(2, x.ndim))
    scale = np.maximum(np.abs(x).max(axis=axes, keepdims=True), 1e-8) / 127.0
    q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    return np.concatenate([scale.astype(np.float32).ravel().view(np.uint8),
                           q.ravel().view(np.uint8)])


def dequantise_int8(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 latent of :func:`quantise_int8`'s bytes."""
    n_scales = shape[0] * shape[1]
    expected = 4 * n_scales + int(np.prod(shape))
    if len(raw) != expected:
        raise StoreError(f"int8 latent of shape {list(shape)} has {len(raw)} bytes,"
                         f" not {expected}")
    scale = np.frombuffer(raw, np.float32, count=n_scales).reshape(
        shape[:2] + (1,) * (len(shape) - 2))
    q = np.frombuffer(raw, np.int8, offset=4 * n_scales).reshape(shape)
    return q.astype(np.float32) * scale


def stored_length(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes one stored latent of ``dtype`` and ``shape`` occupies; StoreError for a dtype
    or shape no store writes."""
    if dtype not in LATENT_DTYPES or not shape or any(
            not isinstance(n, int) or n <= 0 for n in shape):
        raise StoreError(f"no latent is stored as {dtype} of shape {list(shape)}")
    count = int(np.prod(shape))
    if dtype == "int8":
        if len(shape) < 3:
            raise StoreError(f"int8 latents have 3 or more axes, not {list(shape)}")
        return 4 * shape[0] * shape[1] + count
    return count * np.dtype(dtype).itemsize


def checksum(data: bytes) -> str:
    """The checksum an entry's record keeps of each stored latent."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def encode_latents(latents: Mapping[int, Any], dtype: str
                   ) -> tuple[list[int], dict[int, np.ndarray]]:
    """The latents' common shape and their stored form in ``dtype`` (one of the store's
    latent dtypes; int8 latents are packed bytes). StoreError if they do not share a shape
    or a step is negative."""
    if not latents:
        raise StoreError("an entry needs at least one latent")
    raw = {int(step): as_numpy(x) for step, x in latents.items()}
    shapes = {a.shape for a in raw.values()}
    if len(shapes) != 1:
        raise StoreError(f"the latents of one entry must share one shape, not {shapes}")
    if any(step < 0 for step in raw):
        raise StoreError("latent steps must be non-negative integers")
    if dtype == "int8":
        arrays = {s: quantise_int8(a) for s, a in raw.items()}
    else:
        arrays = {s: np.ascontiguousarray(a.astype(np.dtype(dtype), copy=False))
                  for s, a in raw.items()}
    return list(shapes.pop()), arrays


def decode_latent(raw: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A stored latent as an array of its stored dtype (a copy); int8 reads as float32."""
    if dtype == "int8":
        return dequantise_int8(raw, shape)
    return np.frombuffer(raw, np.dtype(dtype)).reshape(shape).copy()
