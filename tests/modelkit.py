"""Helpers for model tests."""

from __future__ import annotations

import torch


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter random values: training-start zeros would hide mixing bugs.

    Norm weights stay near 1 so normalised activations keep their scale.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return model
