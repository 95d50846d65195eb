"""OpenSora 1.2's rectified-flow sampler: timestep schedule, guidance, Euler integration.

Conventions: t runs from 1000 (pure noise) to 0 (data); x_t = (1 - t/1000)·x0 + (t/1000)·ε
and the model predicts v = x0 - ε, so an Euler step toward t = 0 is z += v·Δt/1000.

Step numbering is 1-based, as in the CHAI paper: step k is fed latent z_k, and z_1 is the
initial noise. A per-step hook sees (k, t_k, z_k) before the model runs, which is where
progress reporting, cancellation and latent capture attach.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from chaid.models.stdit3 import BlockAttnPlan, BlockRunner, STDiT3, STDiT3Block, self_attention
from chaid.models.text import TextEmbedding
from chaid.numerics import Numerics

# Training timesteps of OpenSora 1.2; t is continuous in [0, NUM_TIMESTEPS].
NUM_TIMESTEPS = 1000

# hook(step, t, z): step is 1-based, t the (transformed) timestep, z the latent fed at step.
StepHook = Callable[[int, float, torch.Tensor], None]


def transform_ratio(height: int, width: int, latent_frames: int, base_side: int = 512) -> float:
    """r = sqrt(H·W / base²) · sqrt(F_lat): larger videos spend more steps at high noise."""
    return math.sqrt(height * width / base_side**2) * math.sqrt(latent_frames)


def timestep_transform(t: float, ratio: float) -> float:
    """Map t in [0, 1000] through t' = r·s / (1 + (r-1)·s), s = t/1000."""
    s = t / NUM_TIMESTEPS
    return ratio * s / (1 + (ratio - 1) * s) * NUM_TIMESTEPS


def upstream_schedule(
    num_steps: int,
    height: int,
    width: int,
    frames: int,
    latent_frames: int,
    size_dtype: torch.dtype,
    base_side: int = 512,
) -> list[float]:
    """The timesteps upstream's sampler feeds the model, to the fp32 bit.

    Its inference script holds height, width and frame count in tensors of the model dtype,
    so in bfloat16 the ratio r is computed in bf16 (240p 51 frames: 2.421875 against the
    exact 2.41872; a width of 854 is held as 856), while t and the transform itself run in
    float32.

    The frame count is upstream's ``frames // 17 * 5``, its VAE's rate for whole 17-frame
    chunks (1 for an image). That agrees with the VAE at the trained lengths (multiples of
    17) and counts only whole chunks otherwise (60 frames: 15, the VAE makes 18). Below 17
    frames upstream's count is 0, which makes r = 0, a NaN first timestep and every other
    0 (nothing is denoised); there the real count, ``latent_frames``, is used.
    """
    if num_steps < 1:
        raise ValueError("num_steps must be at least 1")
    h = torch.tensor([float(height)], dtype=size_dtype)
    w = torch.tensor([float(width)], dtype=size_dtype)
    count = torch.tensor([float(frames)], dtype=size_dtype)
    if 1 < frames < 17:
        count = torch.tensor([float(latent_frames)], dtype=size_dtype)
    elif frames != 1:
        count = count // 17 * 5
    else:
        count = torch.ones_like(count)
    ratio = (h * w / (base_side * base_side)).sqrt() * count.sqrt() * 1.0
    out = []
    for i in range(num_steps):
        t = torch.tensor([(1.0 - i / num_steps) * NUM_TIMESTEPS]) / NUM_TIMESTEPS
        out.append(float((ratio * t / (1 + (ratio - 1) * t) * NUM_TIMESTEPS)[0]))
    return out


def run_schedule(
    num_steps: int,
    *,
    height: int,
    width: int,
    frames: int,
    latent_frames: int,
    numerics: Numerics,
    size_dtype: torch.dtype,
    base_side: int = 512,
) -> list[float]:
    """The timesteps of a run of ``frames`` × ``height`` × ``width`` whose latent has
    ``latent_frames`` frames: upstream's (:func:`upstream_schedule`) or the exact one (r
    from the real latent count, in float64)."""
    if numerics is Numerics.UPSTREAM:
        return upstream_schedule(num_steps, height, width, frames, latent_frames, size_dtype,
                                 base_side)
    return schedule(num_steps, transform_ratio(height, width, latent_frames, base_side))


def schedule(num_steps: int, ratio: float | None = None) -> list[float]:
    """The num_steps timesteps of a run, from 1000 down (the run then integrates to 0).

    t_i = (1 - i/N)·1000 for i = 0..N-1, each passed through the transform when a ratio
    is given.
    """
    if num_steps < 1:
        raise ValueError("num_steps must be at least 1")
    ts = [(1.0 - i / num_steps) * NUM_TIMESTEPS for i in range(num_steps)]
    if ratio is not None:
        ts = [timestep_transform(t, ratio) for t in ts]
    return ts


def guidance_rows(scale: float | None, temporal_scale: float = 0.0) -> int:
    """Model rows per request under :class:`Guidance`: the prompt, the null caption when
    guided (``scale`` set), the temporal-skip branch when ``temporal_scale`` is on."""
    return (1 if scale is None else 2) + (1 if temporal_scale else 0)


@dataclass
class Guidance:
    """Classifier-free guidance, and optionally temporal guidance, around one DiT call per
    step.

    The batch is [conditional; unconditional]; the unconditional branch uses the DiT's
    learned null caption with the conditional prompt's mask. ``scale=None`` runs the
    conditional branch alone (no guidance).

    Temporal guidance (``temporal_scale`` > 0; spatiotemporal skip guidance, Hyung et al.
    2024) adds a third branch: the conditional prompt again, with the temporal
    self-attention of every block made the identity (each frame attends to itself
    only), so that branch draws what the model draws without looking across frames;
    v += temporal_scale · (v_cond − v_skip) pushes each step away from it. It costs one
    more row per request in the same call. A step whose call carries an attention plan
    (Cache Attention) runs without it: that plan is laid out for two branches.
    """

    dit: STDiT3
    text: TextEmbedding
    scale: float | None
    fps: float
    height: int
    width: int
    temporal_scale: float = 0.0

    def __post_init__(self) -> None:
        b = self.text.states.shape[0]
        dtype = self.dit.dtype
        states = self.text.states.to(dtype)
        if self.scale is None:
            self._y, self._mask = states, self.text.mask
        else:
            null = self.dit.null_caption(b).to(states.device, dtype)
            self._y = torch.cat([states, null], dim=0)
            self._mask = torch.cat([self.text.mask, self.text.mask], dim=0)
        if self.temporal_scale:
            self._y_skip = torch.cat([self._y, states], dim=0)
            self._mask_skip = torch.cat([self._mask, self.text.mask], dim=0)

    def velocity(
        self,
        z: torch.Tensor,
        t: float | torch.Tensor,
        attn_plan: BlockAttnPlan | None = None,
        block_runner: BlockRunner | None = None,
    ) -> torch.Tensor:
        """v for latents z (B, C, T, H, W) at timestep t: (B, C, T, H, W) in fp32.

        ``t`` is one timestep for every row, or one per row (B,) (several requests batched,
        each at its own step). ``attn_plan`` and ``block_runner`` are passed to the DiT
        unchanged (every branch of the batch goes through one call, so one runner decision
        covers them all).
        """
        guided = guidance_rows(self.scale)
        skip = bool(self.temporal_scale) and attn_plan is None
        branches = guidance_rows(self.scale, self.temporal_scale if skip else 0.0)
        y, mask = (self._y_skip, self._mask_skip) if skip else (self._y, self._mask)
        z_in = torch.cat([z] * branches, dim=0) if branches > 1 else z
        if isinstance(t, torch.Tensor):
            t_in = t.to(device=z.device, dtype=torch.float32).repeat(branches)
        else:
            t_in = torch.full((z_in.shape[0],), t, dtype=torch.float32, device=z.device)
        out = self.dit(
            z_in,
            t_in,
            y,
            mask,
            fps=self.fps,
            height=self.height,
            width=self.width,
            attn_plan=_skip_temporal_plan(guided, branches) if skip else attn_plan,
            block_runner=block_runner,
        )
        v = out[:, : z.shape[1]]  # the variance channels are unused at inference
        rows = v.split(z.shape[0], dim=0)
        cond = rows[0]
        if self.scale is None:
            guided_v = cond
        else:
            uncond = rows[1]
            guided_v = uncond + self.scale * (cond - uncond)
        if skip:
            guided_v = guided_v + self.temporal_scale * (cond - rows[-1])
        return guided_v


def _skip_temporal_plan(kept: int, branches: int) -> BlockAttnPlan:
    """An attention plan under which the last of ``branches`` equal row groups attends
    across frames to itself only (the identity) in every temporal block; the first
    ``kept`` groups attend as usual."""

    def attend(block: STDiT3Block, h: torch.Tensor, prepare) -> torch.Tensor:
        # temporal layout: (batch*S, T, C), the batch's rows in order, so a group's rows
        # are contiguous
        start = h.shape[0] * kept // branches
        q, k, v = block.attn.project_qkv(h[:start])
        own = block.attn.qkv(h[start:]).chunk(3, dim=-1)[2]  # the values, unrotated
        return torch.cat([block.attn.project_out(self_attention(q, k, v)),
                          block.attn.proj(own)])

    def plan(kind: str, index: int):
        return attend if kind == "temporal" else None

    return plan


def euler_step(z: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """One Euler step of the flow from timestep ``t`` to ``t_next`` (t_next = 0 after the
    last of a schedule): z + v·(t - t_next)/1000."""
    return z + v * ((t - t_next) / NUM_TIMESTEPS)


def stochastic_step(z: torch.Tensor, v: torch.Tensor, t: float, t_next: float, eta: float,
                    noise: torch.Tensor) -> torch.Tensor:
    """One stochastic step from ``t`` to ``t_next``: z's clean estimate x0 = z + s·v and
    noise estimate ε = z − (1 − s)·v (s = t/1000) are mixed again at t_next, with a share
    ``eta`` of the noise fresh: (1 − s')·x0 + s'·(√(1 − η²)·ε + η·noise).

    η = 0 is the Euler step (to rounding); η = 1 keeps only the clean estimate and draws
    all of the next step's noise afresh (ancestral sampling). Re-drawing the noise lets
    later steps correct an estimate the earlier ones got wrong, where the ODE carries
    the error along (docs/shapes.md: on tiny-shapes it stops most bounce jumps and extra
    objects). ``noise`` is standard normal, shaped like z; at t_next = 0 it has no effect.
    """
    s, s_next = t / NUM_TIMESTEPS, t_next / NUM_TIMESTEPS
    x0 = z + s * v
    eps = z - (1 - s) * v
    return (1 - s_next) * x0 + s_next * (math.sqrt(1 - eta * eta) * eps + eta * noise)


def step_noise(seed: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The fresh noise of step ``step`` (1-based) of a run with ``seed``: drawn on the CPU
    from the two alone, so a run draws the same noise on every device, batched or alone,
    and a run continued from a stored latent at step k draws what the whole run drew from
    k on."""
    gen = torch.Generator(device="cpu").manual_seed(
        (seed * STEP_NOISE_STRIDE + step) % (2**63))
    return torch.randn(shape, generator=gen)


# Separates the step-noise seeds of one run from the next seed's (runs have < 10^6 steps).
STEP_NOISE_STRIDE = 1_000_003
