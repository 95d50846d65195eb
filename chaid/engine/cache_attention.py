"""Cache Attention inside the model: which blocks, at which steps, on which tokens.

At a fast-mode step k in ``cache_steps``, each chosen spatial block computes its queries
from the current tokens as usual, and its keys and values from the cached latent z_k of an
earlier full run: z_k goes through the model's own patch and position embedding, the
block's own LN and adaLN modulation (of the current step), its own qkv projection and k
norm. Frame f of the query attends to frame f of the cache. The block's own output
projection and gate follow; nothing else in the model changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from chaid.config import ChaiSettings
from chaid.errors import InputError
from chaid.kernels import cache_attention
from chaid.models.stdit3 import BlockAttnPlan, SelfAttnOverride, STDiT3, STDiT3Block, self_attention


@dataclass
class CacheAttention:
    """The Cache Attention of one request: its cached latents and the settings that place them.

    Args:
        dit: the model (read only).
        latents: step k → cached z_k, (C, T, H, W) like the request's latent; any dtype.
        settings: cache_steps, cache_blocks, branches, kv_source, blend and kernel.
        height, width: the video size in pixels (position-embedding scale).
        guided: whether the batch is [cond; uncond] (classifier-free guidance).
    """

    dit: STDiT3
    latents: Mapping[int, torch.Tensor]
    settings: ChaiSettings
    height: int
    width: int
    guided: bool

    def check(self, latent_shape: tuple[int, ...]) -> None:
        """InputError unless every cached step is present with the request's latent shape."""
        missing = [k for k in self.settings.cache_steps if k not in self.latents]
        if missing:
            raise InputError(f"the cache entry has no latent for steps {missing}")
        for k in self.settings.cache_steps:
            if tuple(self.latents[k].shape) != tuple(latent_shape):
                raise InputError(
                    f"cached latent of step {k} has shape {tuple(self.latents[k].shape)},"
                    f" the request {tuple(latent_shape)}"
                )
        depth = self.dit.cfg.depth
        if any(b >= depth for b in self.settings.cache_blocks):
            raise InputError(
                f"cache_blocks {list(self.settings.cache_blocks)} exceed the model's {depth} blocks"
            )

    def tokens(self, step: int, device: torch.device) -> torch.Tensor | None:
        """The cached z_step through the model's patch and position embedding, (1, T*S, C),
        or None when ``step`` is not a cache step."""
        if step not in self.settings.cache_steps:
            return None
        cached = self.latents[step].to(device=device, dtype=self.dit.dtype)[None]
        with torch.no_grad():
            return self.dit.embed_tokens(cached, self.height, self.width)


def batch_plan(attentions: list[CacheAttention | None], steps: list[int], branches: int,
               device: torch.device) -> BlockAttnPlan | None:
    """The attention plan of one model call over several requests: request ``i`` (rows
    ``i`` of each of the ``branches`` guidance branches, [cond rows; uncond rows]) runs
    Cache Attention at its step ``steps[i]`` when ``attentions[i]`` has a latent for it,
    and plain self-attention otherwise. The requests share the settings, the video size
    and the guidance (one call); None when no request attends to a cache at its step."""
    batch = len(attentions)
    tokens = [a.tokens(k, device) if a is not None else None
              for a, k in zip(attentions, steps, strict=True)]
    if all(t is None for t in tokens):
        return None
    first = next(a for a, t in zip(attentions, tokens, strict=True) if t is not None)
    settings = first.settings
    filler = next(t for t in tokens if t is not None)
    # one row of cache tokens per model row (unused rows get any request's: they are
    # computed, then ignored)
    cache = torch.cat([t if t is not None else filler for t in tokens] * branches)
    cond_only = settings.branches == "cond" and first.guided
    attends = torch.tensor([tokens[i] is not None and not (cond_only and g > 0)
                            for g in range(branches) for i in range(batch)])
    every_row = bool(attends.all())
    blocks = set(settings.cache_blocks)

    def cached(q, k, v, k_cur, v_cur) -> torch.Tensor:
        if settings.kv_source == "cache+current":
            k, v = torch.cat([k, k_cur], dim=2), torch.cat([v, v_cur], dim=2)
        o = cache_attention(q, k, v, settings.kernel)
        if settings.blend != 1.0:
            own = self_attention(q, k_cur, v_cur)
            o = own + settings.blend * (o - own)
        return o

    def attend(block: STDiT3Block, h: torch.Tensor, prepare) -> torch.Tensor:
        # spatial layout: (rows * T, S, C), each model row's T frames together
        q, k_cur, v_cur = block.attn.project_qkv(h)
        _, k, v = block.attn.project_qkv(prepare(cache))
        if every_row:
            return block.attn.project_out(cached(q, k, v, k_cur, v_cur))
        mask = attends.repeat_interleave(h.shape[0] // attends.numel()).to(h.device)
        rest = ~mask
        o = torch.empty_like(q)
        o[mask] = cached(q[mask], k[mask], v[mask], k_cur[mask], v_cur[mask])
        o[rest] = self_attention(q[rest], k_cur[rest], v_cur[rest])  # attending to itself
        return block.attn.project_out(o)

    def plan(kind: str, index: int) -> SelfAttnOverride | None:
        return attend if kind == "spatial" and index in blocks else None

    return plan
