"""STDiT3: the spatial-temporal diffusion transformer of OpenSora 1.2, weight-compatible.

Parameter names and shapes match the released STDiT3-XL/2 checkpoint so it loads with a
strict, shape-checked mapping (see chaid/models/weights.py). Small configs of the same class
serve tests and the embedded default.

Shapes used in comments: B batch, C hidden size, T/H/W latent frames and token rows/cols
after patching, S = H*W tokens per frame, L caption tokens, D head dim, nh heads.

The forward pass, in order:
  1. patch-embed the latent (right-padding H and W to the patch size), tokens ordered T, H, W
  2. add the 2D sin-cos position embedding (same for every frame; no temporal embedding)
  3. embed t and fps ([cos, sin] sinusoids through an MLP), sum them, and derive the six
     adaLN-single modulation rows shared by all blocks (t_block); with upstream numerics
     (chaid/numerics.py) t is first rounded to the model dtype, as upstream's
     forward does
  4. project the caption states; padded caption tokens are masked out of cross-attention
  5. alternate spatial and temporal blocks
  6. final layer (modulated by the raw t+fps embedding) and unpatchify
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chaid import interrupt
from chaid.numerics import Numerics

# --------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class STDiT3Config:
    # Width of every token; cost grows with its square.
    hidden_size: int = 1152
    # Spatial+temporal block pairs; cost grows linearly.
    depth: int = 28
    # Attention heads; head_dim = hidden_size / num_heads must be even (RoPE pairs).
    num_heads: int = 16
    # Latent patch (T, H, W); a larger spatial patch means fewer tokens and coarser detail.
    patch_size: tuple[int, int, int] = (1, 2, 2)
    # Latent channels of the VAE.
    in_channels: int = 4
    # 2x in_channels when the model predicts a variance too (OpenSora does; only the first
    # in_channels are used at inference).
    out_channels: int = 8
    # Width of the text encoder's token states (T5-XXL 4096, MiniLM 384).
    caption_channels: int = 4096
    # Caption tokens; also the length of the learned null caption used for guidance.
    model_max_length: int = 300
    # MLP width multiplier.
    mlp_ratio: float = 4.0
    # RMSNorm on per-head q and k; stabilises attention at scale.
    qk_norm: bool = True
    # Reference side in pixels: position embeddings and the timestep transform are scaled
    # relative to a square video of this side.
    input_sq_size: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def check(self) -> STDiT3Config:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} not divisible by {self.num_heads} heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.hidden_size % 4:
            raise ValueError("hidden_size must be a multiple of 4 for the 2D position embedding")
        return self


# --------------------------------------------------------------------------------------
# Small pieces


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x * (1 + scale) + shift."""
    return x * (1 + scale) + shift


def sinusoid_cos_sin(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (N,) tensor laid out [cos | sin], computed in fp32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb  # (N, dim)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; statistics in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class RotaryEmbedding(nn.Module):
    """Interleaved (GPT-J style) rotary position embedding over the full head dim.

    Frequencies are recomputed, not stored: checkpoints may carry ``rope.freqs`` and the
    loader checks it against these values.

    ``in_input_dtype`` (set with upstream numerics) rotates as OpenSora's rotary library
    does in a bf16 model: its frequencies are a parameter cast with the model, positions
    are built in the input's dtype, and the angles, their cos/sin and the rotation are
    computed in that dtype (an angle of 29 rad is held to 0.125 in bf16). Otherwise the
    rotation is computed in float32 and rounded once.
    """

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.in_input_dtype = False

    def freqs(self, device: torch.device | None = None) -> torch.Tensor:
        return 1.0 / (
            self.theta
            ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim)
        )  # (D/2,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x of shape (..., N, D) by position 0..N-1 along the second-to-last dim."""
        n = x.shape[-2]
        dtype = x.dtype if self.in_input_dtype else torch.float32
        pos = torch.arange(n, dtype=dtype, device=x.device)
        freqs = self.freqs(x.device).to(dtype)
        angles = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)  # (N, D)
        xs = x.to(dtype)
        x_pairs = xs.unflatten(-1, (-1, 2))
        rotated = torch.stack([-x_pairs[..., 1], x_pairs[..., 0]], dim=-1).flatten(-2)
        out = xs * angles.cos() + rotated * angles.sin()
        return out.to(x.dtype)


class Mlp(nn.Module):
    """fc1 → GELU(tanh) → fc2."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed3D(nn.Module):
    """Conv3d with kernel = stride = patch; H and W (and T) right-padded to a multiple."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        x = F.pad(x, (0, (-w) % pw, 0, (-h) % ph, 0, (-t) % pt))
        x = self.proj(x)  # (B, C, T', H', W')
        return x.flatten(2).transpose(1, 2)  # (B, T'*H'*W', C)


class TimestepEmbedder(nn.Module):
    """Scalar (timestep or fps) → 256-d [cos, sin] sinusoid → Linear, SiLU, Linear."""

    FREQ_DIM = 256

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(self.FREQ_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(sinusoid_cos_sin(t, self.FREQ_DIM).to(dtype))  # (B, C)


class CaptionEmbedder(nn.Module):
    """Projects text-encoder states to the hidden size; holds the learned null caption."""

    def __init__(self, caption_channels: int, hidden_size: int, max_length: int) -> None:
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        # The null caption for classifier-free guidance (a persistent buffer, as released).
        self.register_buffer(
            "y_embedding", torch.randn(max_length, caption_channels) / caption_channels**0.5
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)  # (B, L, C)


@functools.lru_cache(maxsize=64)
def _pos_embed_2d_cpu(dim: int, h: int, w: int, scale: float, base_size: int) -> torch.Tensor:
    half = dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
    rows = torch.arange(h, dtype=torch.float32) / scale * (base_size / h)
    cols = torch.arange(w, dtype=torch.float32) / scale * (base_size / w)
    row_of = rows[:, None].expand(h, w).reshape(-1)  # token order: row-major over (H, W)
    col_of = cols[None, :].expand(h, w).reshape(-1)

    def sin_cos(p: torch.Tensor) -> torch.Tensor:
        a = torch.outer(p, inv_freq)
        return torch.cat([torch.sin(a), torch.cos(a)], dim=-1)

    # First half encodes the column coordinate, second half the row.
    return torch.cat([sin_cos(col_of), sin_cos(row_of)], dim=-1)  # (S, dim)


def position_embedding_2d(
    dim: int, h: int, w: int, scale: float, base_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The spatial position embedding of OpenSora 1.2 for an h x w token grid, (1, S, dim).

    Positions are divided by ``scale`` (video side relative to input_sq_size) and stretched
    to ``base_size`` = round(sqrt(S)) along each axis. Computed in fp32, then cast.
    """
    emb = _pos_embed_2d_cpu(dim, h, w, float(scale), int(base_size))
    return emb.to(device=device, dtype=dtype)[None]


# --------------------------------------------------------------------------------------
# Attention


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The one attention call every self-attention makes: (N, nh, Lq, D) x (N, nh, Lk, D).

    Cache Attention replaces the keys and values given here in chosen blocks; the call
    itself stays this function.
    """
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention with q/k RMSNorm and optional RoPE (temporal blocks).

    The three stages are separate methods so a caller can compute keys and values from
    other tokens (Cache Attention) and keep the rest of the block unchanged.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rope: RotaryEmbedding | None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm: nn.Module = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # Temporal blocks rotate q and k by frame index; the module holds no tensors.
        self.rope = rope

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, L, C) → q, k, v each (N, nh, L, D), q and k normed and rotated."""
        n, length, _ = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        return q, k, v

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        """(N, nh, L, D) → (N, L, C)."""
        return self.proj(o.transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project_qkv(x)
        return self.project_out(self_attention(q, k, v))  # (N, L, C)


class CrossAttention(nn.Module):
    """Tokens attend to their own sample's caption; padded caption tokens are masked."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
        """x (B, N, C), y (B, L, C), y_mask (B, L) bool → (B, N, C)."""
        b, n, c = x.shape
        q = self.q_linear(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (
            self.kv_linear(y).view(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=y_mask[:, None, None, :])
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


# --------------------------------------------------------------------------------------
# Blocks


# A self-attention override for one block in one forward call: called as
# ``attn_fn(block, h, prepare)`` with h the block's LN-modulated tokens in attention layout and
# ``prepare(tokens)`` mapping other (B, T*S, C) tokens through the same LN, modulation and
# layout; returns the attention output (before the gate) in h's layout.
SelfAttnOverride = Callable[
    ["STDiT3Block", torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor
]
# Given (block kind "spatial" or "temporal", block index) → that block's override or None.
BlockAttnPlan = Callable[[str, int], SelfAttnOverride | None]
# Runs pair i (spatial block i, then temporal block i) on tokens (B, T*S, C).
RunPair = Callable[[int, torch.Tensor], torch.Tensor]
# Runs the whole block stack of one forward call: ``block_runner(x, run_pair, depth)`` → the
# tokens after the last pair. The default is ``for i in range(depth): x = run_pair(i, x)``;
# an intra-inference cache (chaid.engine.intra_cache) may skip pairs and reuse residuals.
BlockRunner = Callable[[torch.Tensor, RunPair, int], torch.Tensor]


class STDiT3Block(nn.Module):
    """One spatial or temporal transformer block with adaLN-single modulation."""

    def __init__(self, cfg: STDiT3Config, temporal: bool, rope: RotaryEmbedding | None) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(c, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(c, cfg.num_heads, cfg.qk_norm, rope if temporal else None)
        self.cross_attn = CrossAttention(c, cfg.num_heads)
        self.norm2 = nn.LayerNorm(c, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(c, int(c * cfg.mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, c) / c**0.5)

    def modulation(self, t_mlp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 6C) → the six modulation rows, each (B, 1, C):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp."""
        b = t_mlp.shape[0]
        return (self.scale_shift_table[None] + t_mlp.reshape(b, 6, -1)).chunk(6, dim=1)

    def to_attention_layout(self, h: torch.Tensor, T: int, S: int) -> torch.Tensor:
        """(B, T*S, C) → spatial: (B*T, S, C) one frame per row; temporal: (B*S, T, C)."""
        b, _, c = h.shape
        h = h.view(b, T, S, c)
        if self.temporal:
            h = h.transpose(1, 2)
        return h.reshape(-1, h.shape[2], c)

    def from_attention_layout(self, h: torch.Tensor, B: int, T: int, S: int) -> torch.Tensor:
        c = h.shape[-1]
        if self.temporal:
            return h.view(B, S, T, c).transpose(1, 2).reshape(B, T * S, c)
        return h.view(B, T * S, c)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        y_mask: torch.Tensor,
        t_mlp: torch.Tensor,
        T: int,
        S: int,
        attn_fn: SelfAttnOverride | None = None,
    ) -> torch.Tensor:
        """x (B, T*S, C) → (B, T*S, C).

        ``attn_fn`` replaces the self-attention when given (see SelfAttnOverride).
        """
        B = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t_mlp)

        def prepare(tokens: torch.Tensor) -> torch.Tensor:
            # LN + modulation, then the block's attention layout: (B, T*S, C) → (B*T, S, C) etc.
            return self.to_attention_layout(
                modulate(self.norm1(tokens), shift_msa, scale_msa), T, S
            )

        # 1. self-attention (spatial: within a frame; temporal: across frames at one position)
        h = prepare(x)
        h = attn_fn(self, h, prepare) if attn_fn is not None else self.attn(h)
        x = x + gate_msa * self.from_attention_layout(h, B, T, S)
        # 2. cross-attention to the caption (no norm, no modulation)
        x = x + self.cross_attn(x, y, y_mask)
        # 3. MLP
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """LN → modulate with the raw t embedding → Linear to patch pixels × out channels."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, P*C_out)


# --------------------------------------------------------------------------------------
# The model


class STDiT3(nn.Module):
    def __init__(self, cfg: STDiT3Config) -> None:
        super().__init__()
        self.cfg = cfg.check()
        c = cfg.hidden_size
        self.x_embedder = PatchEmbed3D(cfg.patch_size, cfg.in_channels, c)
        self.t_embedder = TimestepEmbedder(c)
        self.fps_embedder = TimestepEmbedder(c)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, c, cfg.model_max_length)
        self.rope = RotaryEmbedding(cfg.head_dim)
        self.spatial_blocks = nn.ModuleList(
            [STDiT3Block(cfg, temporal=False, rope=None) for _ in range(cfg.depth)]
        )
        self.temporal_blocks = nn.ModuleList(
            [STDiT3Block(cfg, temporal=True, rope=self.rope) for _ in range(cfg.depth)]
        )
        self.final_layer = FinalLayer(c, math.prod(cfg.patch_size), cfg.out_channels)
        self.numerics = Numerics.EXACT
        self.initialize_weights()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model's weights, and so its activations, are held in."""
        return self.x_embedder.proj.weight.dtype

    @property
    def numerics(self) -> Numerics:
        """How the timestep and the rotary embedding round (chaid/numerics.py)."""
        return self._numerics

    @numerics.setter
    def numerics(self, value: Numerics | str) -> None:
        self._numerics = Numerics(value)
        self.rope.in_input_dtype = self._numerics is Numerics.UPSTREAM

    def initialize_weights(self) -> None:
        """Training-start initialisation, as OpenSora's; a no-op on the meta device."""
        if self.x_embedder.proj.weight.is_meta:
            return
        # Linear layers: Xavier-uniform weights, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # Patch embedding: Xavier over the flattened kernel, like a Linear.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # Timestep and adaLN projections start small.
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]):
            nn.init.normal_(lin.weight, std=0.02)
        # fps starts as a no-op: its output layer is zero.
        nn.init.normal_(self.fps_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.fps_embedder.mlp[2].weight)
        # Caption projection.
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        # Temporal blocks start as identity maps so a spatial-only model is the start point.
        for block in self.temporal_blocks:
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.mlp.fc2.weight)

    # -- helpers -------------------------------------------------------------------------

    def token_grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(…, T, H, W) latent → (T', H', W') token grid after padding and patching."""
        t, h, w = latent_shape[-3:]
        pt, ph, pw = self.cfg.patch_size
        return -(-t // pt), -(-h // ph), -(-w // pw)

    def null_caption(self, batch: int) -> torch.Tensor:
        """The learned null caption, (batch, L, caption_channels)."""
        return self.y_embedder.y_embedding[None].expand(batch, -1, -1)

    def embed_tokens(self, z: torch.Tensor, height: float, width: float) -> torch.Tensor:
        """Latent (B, C_in, T, H, W) → position-embedded tokens (B, T'*S, C)."""
        T, H, W = self.token_grid(z.shape)
        S = H * W
        dtype = self.dtype
        x = self.x_embedder(z.to(dtype))  # (B, T*S, C)
        scale = math.sqrt(height * width) / self.cfg.input_sq_size
        pos = position_embedding_2d(
            self.cfg.hidden_size, H, W, scale, round(math.sqrt(S)), x.device, x.dtype
        )  # (1, S, C)
        return (x.view(x.shape[0], T, S, -1) + pos[:, None]).view(x.shape[0], T * S, -1)

    def unpatchify(
        self, x: torch.Tensor, grid: tuple[int, int, int], out_thw: tuple[int, int, int]
    ):
        """(B, T'H'W', pt*ph*pw*C_out) → (B, C_out, T, H, W), padding cropped."""
        T, H, W = grid
        pt, ph, pw = self.cfg.patch_size
        b = x.shape[0]
        x = x.view(b, T, H, W, pt, ph, pw, self.cfg.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(
            b, self.cfg.out_channels, T * pt, H * ph, W * pw
        )
        t, h, w = out_thw
        return x[:, :, :t, :h, :w]

    # -- forward -------------------------------------------------------------------------

    def forward(
        self,
        z: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        y_mask: torch.Tensor | None = None,
        *,
        fps: torch.Tensor | float = 24.0,
        height: float,
        width: float,
        attn_plan: BlockAttnPlan | None = None,
        block_runner: BlockRunner | None = None,
    ) -> torch.Tensor:
        """Predict the flow for latents z at timesteps t in [0, 1000].

        Args:
            z: (B, C_in, T, H, W) latents.
            t: (B,) timesteps.
            y: (B, L, caption_channels) caption states.
            y_mask: (B, L) bool, True for real caption tokens (None: all real).
            fps: frames per second of the video, scalar or (B,).
            height, width: video size in pixels as the model sees it (scales position
                embeddings; with upstream numerics, in the model dtype: see ``as_seen``).
            attn_plan: optional per-block self-attention override (see BlockAttnPlan).
            block_runner: optional driver of the block stack (see BlockRunner); None runs
                every pair in order.

        Returns: (B, out_channels, T, H, W) in fp32.
        """
        B = z.shape[0]
        dtype = self.dtype
        T, H, W = self.token_grid(z.shape)
        S = H * W
        # 1-2. tokens with position embedding
        x = self.embed_tokens(z, height, width)  # (B, T*S, C)
        # 3. timestep + fps → adaLN-single
        fps_t = torch.as_tensor(fps, dtype=torch.float32, device=z.device).reshape(-1).expand(B)
        t = torch.as_tensor(t, dtype=torch.float32, device=z.device).reshape(-1).expand(B)
        if self._numerics is Numerics.UPSTREAM:
            t = t.to(dtype)  # the released weights were trained through this rounding
        t_emb = self.t_embedder(t, dtype) + self.fps_embedder(fps_t, dtype)
        t_mlp = self.t_block(t_emb)  # (B, 6C)
        # 4. caption
        y = self.y_embedder(y.to(dtype))  # (B, L, C)
        if y_mask is None:
            y_mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
        y_mask = y_mask.to(device=y.device, dtype=torch.bool)

        # 5. blocks
        def run_pair(i: int, x: torch.Tensor) -> torch.Tensor:
            interrupt.point()  # a cancel or deadline stops a long forward between blocks
            spatial, temporal = self.spatial_blocks[i], self.temporal_blocks[i]
            x = spatial(x, y, y_mask, t_mlp, T, S, attn_plan("spatial", i) if attn_plan else None)
            interrupt.point()
            return temporal(
                x, y, y_mask, t_mlp, T, S, attn_plan("temporal", i) if attn_plan else None
            )

        depth = len(self.spatial_blocks)
        if block_runner is None:
            for i in range(depth):
                x = run_pair(i, x)
        else:
            x = block_runner(x, run_pair, depth)
        # 6. output
        x = self.final_layer(x, t_emb)  # (B, T*S, P*C_out)
        return self.unpatchify(x, (T, H, W), tuple(z.shape[-3:])).float()
