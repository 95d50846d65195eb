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

    def plan(self, step: int, batch: int, device: torch.device) -> BlockAttnPlan | None:
        """The attention plan for 1-based ``step`` and a model batch of ``batch``, or None."""
        if step not in self.settings.cache_steps:
            return None
        dtype = self.dit.dtype
        cached = self.latents[step].to(device=device, dtype=dtype)[None]
        with torch.no_grad():
            tokens = self.dit.embed_tokens(cached, self.height, self.width)  # (1, T*S, C)
        tokens = tokens.expand(batch, -1, -1)
        attn_fn = self._attn_fn(tokens)
        blocks = set(self.settings.cache_blocks)

        def plan(kind: str, index: int) -> SelfAttnOverride | None:
            return attn_fn if kind == "spatial" and index in blocks else None

        return plan

    def _attn_fn(self, cache_tokens: torch.Tensor) -> SelfAttnOverride:
        settings = self.settings
        cond_only = settings.branches == "cond" and self.guided

        def attend(block: STDiT3Block, h: torch.Tensor, prepare) -> torch.Tensor:
            q, k_cur, v_cur = block.attn.project_qkv(h)  # (B*T, nh, S, D)
            _, k, v = block.attn.project_qkv(prepare(cache_tokens))
            if settings.kv_source == "cache+current":
                k, v = torch.cat([k, k_cur], dim=2), torch.cat([v, v_cur], dim=2)
            if cond_only:
                # rows are [cond frames; uncond frames]: the null branch keeps plain attention
                half = q.shape[0] // 2
                o = torch.cat(
                    [
                        cache_attention(q[:half], k[:half], v[:half], settings.kernel),
                        self_attention(q[half:], k_cur[half:], v_cur[half:]),
                    ]
                )
            else:
                o = cache_attention(q, k, v, settings.kernel)
            if settings.blend != 1.0:
                own = self_attention(q, k_cur, v_cur)
                o = own + settings.blend * (o - own)
            return block.attn.project_out(o)

        return attend
