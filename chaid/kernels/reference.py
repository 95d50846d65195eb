"""Cache Attention, reference implementation: torch's scaled_dot_product_attention.

Queries come from the current tokens, keys and values from the cached tokens; each of the
N rows (one frame of one sample) and each head attends independently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cache_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N, nh, Lq, D) queries x (N, nh, Lk, D) keys/values → (N, nh, Lq, D), scale D^-0.5."""
    return F.scaled_dot_product_attention(q, k, v)
