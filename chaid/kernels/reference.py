"""Cache Attention, reference implementation: torch's scaled_dot_product_attention.

Queries come from the current tokens, keys and values from the cached tokens; each of the
N rows (one frame of one sample) and each head attends independently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chaid.errors import InputError


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """InputError unless q (N, nh, Lq, D) and k, v (N, nh, Lk, D) fit together.

    Cached keys and values come from a stored latent: a mismatch means the entry does not
    fit the request (another shape, model or dtype), which is the request's problem to
    report, not an internal fault.
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise InputError(
            f"cache attention shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)},"
            f" v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise InputError(
            f"cache attention inputs must share dtype and device: q {q.dtype} on {q.device},"
            f" k {k.dtype} on {k.device}, v {v.dtype} on {v.device}"
        )


def cache_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N, nh, Lq, D) queries x (N, nh, Lk, D) keys/values → (N, nh, Lq, D), scale D^-0.5."""
    return F.scaled_dot_product_attention(q, k, v)
