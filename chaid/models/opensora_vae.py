"""VAE v1.2 of OpenSora 1.2, weight-compatible: a 2D image VAE run frame by frame, then a
causal 3D VAE that compresses time by 4.

Pixels (B, 3, F, H, W) in [-1, 1] → 2D VAE per frame (×8 smaller in space, 4 channels) →
temporal VAE per chunk of 17 frames (front-padded with 3 zero frames to 20 → 5 latent
frames) → per-channel normalisation ``(z - shift) / scale``. Decoding runs the same path
backwards and drops the padded frames of each chunk.

Parameter names follow the released ``model.safetensors`` (hpcai-tech/OpenSora-VAE-v1.2):
``spatial_vae.module.*`` is a diffusers ``AutoencoderKL`` (SDXL VAE architecture),
``temporal_vae.*`` the modules below, ``scale`` and ``shift`` buffers of shape
(1, C, 1, 1, 1). Small configs of the same classes serve tests.

Shapes in comments: B batch, C channels, T frames (latent or 2D-latent), H/W rows/cols.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from chaid import interrupt
from chaid.errors import InputError, WeightsError
from chaid.models.weights import load_weights
from chaid.numerics import Numerics

# --------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class SpatialVAEConfig:
    # Widths of the four 2D levels (SDXL VAE); each level after the first halves H and W.
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    # Res-blocks per level; more is slower and sharper.
    layers_per_block: int = 2
    # GroupNorm groups; must divide every width.
    norm_num_groups: int = 32
    # Channels of the 2D latent, which is also the temporal VAE's input.
    latent_channels: int = 4
    # Fixed multiplier of the 2D latent (OpenSora's, not the SDXL config's 0.13025).
    scaling_factor: float = 0.18215

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class TemporalVAEConfig:
    # Channels in and out: the 2D latent.
    in_out_channels: int = 4
    # Channels of the video latent the DiT denoises.
    latent_channels: int = 4
    # Base width of the 3D convolutions; cost grows with its square.
    filters: int = 128
    # Width multiplier of each level.
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    # Res-blocks per level.
    num_res_blocks: int = 4
    # Between level i and i+1: True halves time (encoder) and doubles it back (decoder).
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    # GroupNorm groups; must divide every width.
    num_groups: int = 32

    @property
    def time_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)


@dataclass(frozen=True)
class OpenSoraVAEConfig:
    spatial: SpatialVAEConfig = field(default_factory=SpatialVAEConfig)
    temporal: TemporalVAEConfig = field(default_factory=TemporalVAEConfig)
    # Frames per 2D-VAE call: bounds activation memory; results do not depend on it.
    micro_batch_size: int = 4
    # Frames per temporal-VAE chunk; chunks are encoded independently (trained at 17).
    micro_frame_size: int = 17
    # Per-channel statistics of the temporal latent: z_model = (z - shift) / scale.
    shift: tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
    scale: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)
    # logvar of the temporal posterior is clamped to this range (as trained).
    logvar_range: tuple[float, float] = (-30.0, 20.0)

    @property
    def latent_channels(self) -> int:
        return self.temporal.latent_channels

    def chunk_frames(self, frames: int) -> list[int]:
        """Frames of each temporal chunk: 51 → [17, 17, 17], 40 → [17, 17, 6]."""
        size = self.micro_frame_size
        return [min(size, frames - start) for start in range(0, frames, size)]

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a video: each chunk of n frames gives ceil(n / 4)."""
        tf = self.temporal.time_factor
        return sum(-(-n // tf) for n in self.chunk_frames(frames))


# --------------------------------------------------------------------------------------
# The temporal VAE


class CausalConv3d(nn.Module):
    """Conv3d whose output at frame t sees input frames <= t only.

    Time is zero-padded at the front by ``kernel_t - stride_t`` frames (none at the back);
    height and width are zero-padded symmetrically ("same" size for stride 1).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        time_stride: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        time_pad = kt - time_stride
        # F.pad order: (W left, W right, H top, H bottom, T front, T back)
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, time_pad, 0)
        self.conv = nn.Conv3d(
            in_channels, out_channels, (kt, kh, kw), stride=(time_stride, 1, 1), bias=bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))  # (B, C_out, T', H, W)


class ResBlock3d(nn.Module):
    """GroupNorm → SiLU → causal conv, twice, plus a 1×1×1 projection of the input when the
    width changes. GroupNorm statistics span the whole chunk (time included), as trained."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, bias=False)
        self.conv3 = (
            CausalConv3d(in_channels, out_channels, 1, bias=False)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv3(x) if self.conv3 is not None else x)


def _level_blocks(in_ch: int, out_ch: int, count: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList(
        [ResBlock3d(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(count)]
    )


class TemporalEncoder(nn.Module):
    """2D latent (B, 4, T, H, W) → posterior moments (B, 2·latent, T/4, H, W)."""

    def __init__(self, cfg: TemporalVAEConfig) -> None:
        super().__init__()
        widths = [cfg.filters * m for m in cfg.channel_multipliers]
        self.conv_in = CausalConv3d(cfg.in_out_channels, cfg.filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        # Between levels: a stride-2 causal conv where time is halved, else nothing.
        self.conv_blocks = nn.ModuleList()
        prev = cfg.filters
        for i, width in enumerate(widths):
            self.block_res_blocks.append(
                _level_blocks(prev, width, cfg.num_res_blocks, cfg.num_groups)
            )
            prev = width
            if i < len(widths) - 1:
                self.conv_blocks.append(
                    CausalConv3d(width, width, 3, time_stride=2)
                    if cfg.temporal_downsample[i]
                    else nn.Identity()
                )
        self.res_blocks = _level_blocks(prev, prev, cfg.num_res_blocks, cfg.num_groups)
        self.norm1 = nn.GroupNorm(cfg.num_groups, prev)
        self.conv2 = CausalConv3d(prev, 2 * cfg.latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for i, level in enumerate(self.block_res_blocks):
            for block in level:
                x = block(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))  # (B, 2·latent, T/4, H, W)


class TemporalDecoder(nn.Module):
    """Latent (B, latent, T, H, W) → 2D latent (B, 4, 4T, H, W).

    Time is doubled by a causal conv to twice the channels followed by depth-to-time:
    channel c·2 + s becomes channel c of output frame 2t + s.
    """

    def __init__(self, cfg: TemporalVAEConfig) -> None:
        super().__init__()
        widths = [cfg.filters * m for m in cfg.channel_multipliers]
        top = widths[-1]
        self.conv1 = CausalConv3d(cfg.latent_channels, top, 3)
        self.res_blocks = _level_blocks(top, top, cfg.num_res_blocks, cfg.num_groups)
        # Built from the deepest level up, stored shallowest first (index = level).
        levels: list[nn.ModuleList] = []
        ups: list[nn.Module] = []
        prev = top
        for i in reversed(range(len(widths))):
            levels.insert(0, _level_blocks(prev, widths[i], cfg.num_res_blocks, cfg.num_groups))
            prev = widths[i]
            if i > 0:
                ups.insert(
                    0,
                    CausalConv3d(prev, prev * 2, 3)
                    if cfg.temporal_downsample[i - 1]
                    else nn.Identity(),
                )
        self.block_res_blocks = nn.ModuleList(levels)
        # conv_blocks[i - 1] runs after level i (i > 0).
        self.conv_blocks = nn.ModuleList(ups)
        self.norm1 = nn.GroupNorm(cfg.num_groups, prev)
        self.conv_out = CausalConv3d(prev, cfg.in_out_channels, 3)
        self.temporal_upsample = cfg.temporal_downsample

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0:
                x = self.conv_blocks[i - 1](x)
                if self.temporal_upsample[i - 1]:
                    b, c2, t, h, w = x.shape
                    x = (
                        x.view(b, c2 // 2, 2, t, h, w)
                        .transpose(2, 3)
                        .reshape(b, c2 // 2, 2 * t, h, w)
                    )
        return self.conv_out(F.silu(self.norm1(x)))  # (B, 4, 4T, H, W)


class TemporalVAE(nn.Module):
    """The causal 3D VAE: one chunk of 2D latents ↔ its temporal latent."""

    def __init__(self, cfg: TemporalVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = TemporalEncoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = CausalConv3d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = TemporalDecoder(cfg)

    def time_padding(self, frames: int) -> int:
        """Zero frames put in front so the chunk length is a multiple of the time factor."""
        return (-frames) % self.cfg.time_factor

    def encode(
        self, x: torch.Tensor, logvar_range: tuple[float, float], generator=None
    ) -> torch.Tensor:
        """(B, 4, n, H, W) → (B, latent, ceil(n/4), H, W): the posterior mean, or a sample
        when a generator is given."""
        x = F.pad(x, (0, 0, 0, 0, self.time_padding(x.shape[2]), 0))
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        if generator is None:
            return mean
        std = torch.exp(0.5 * logvar.clamp(*logvar_range))
        noise = torch.randn(mean.shape, generator=generator, device=generator.device)
        return mean + std * noise.to(mean)

    def decode(self, z: torch.Tensor, frames: int) -> torch.Tensor:
        """(B, latent, T, H, W) → (B, 4, frames, H, W), the front padding dropped."""
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, self.time_padding(frames) :]


# --------------------------------------------------------------------------------------
# The 2D VAE


def build_autoencoder_kl(cfg: SpatialVAEConfig) -> nn.Module:
    """A diffusers AutoencoderKL of this config (random weights on the current device)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise WeightsError("the OpenSora VAE needs the diffusers package") from None
    levels = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        act_fn="silu",
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scaling_factor,
    )


class SpatialVAE(nn.Module):
    """The 2D VAE applied to every frame, ``micro_batch_size`` frames per call."""

    def __init__(self, cfg: SpatialVAEConfig, micro_batch_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.micro_batch_size = micro_batch_size
        self.module = build_autoencoder_kl(cfg)

    def encode(self, video: torch.Tensor, generator=None) -> torch.Tensor:
        """(B, 3, F, H, W) → (B, 4, F, H/8, W/8), scaled by scaling_factor."""
        b = video.shape[0]
        frames = video.transpose(1, 2).flatten(0, 1)  # (B*F, 3, H, W)
        out = []
        for chunk in frames.split(self.micro_batch_size):
            dist = self.module.encode(chunk).latent_dist
            z = dist.mode() if generator is None else dist.sample(generator)
            out.append(z * self.cfg.scaling_factor)
        z = torch.cat(out)
        return z.unflatten(0, (b, -1)).transpose(1, 2)  # (B, 4, F, h, w)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 4, F, h, w) → (B, 3, F, 8h, 8w)."""
        b = z.shape[0]
        latents = z.transpose(1, 2).flatten(0, 1)  # (B*F, 4, h, w)
        out = []
        for chunk in latents.split(self.micro_batch_size):
            interrupt.point()
            out.append(self.module.decode(chunk / self.cfg.scaling_factor).sample)
        return torch.cat(out).unflatten(0, (b, -1)).transpose(1, 2)


# --------------------------------------------------------------------------------------
# The pipeline


class OpenSoraVAE(nn.Module):
    """VAE v1.2 as a chaid VideoAutoencoder.

    ``encode`` returns the posterior mean of each stage (deterministic; OpenSora samples
    during training), or a sample when given a generator.
    """

    def __init__(self, cfg: OpenSoraVAEConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or OpenSoraVAEConfig()
        if cfg.spatial.latent_channels != cfg.temporal.in_out_channels:
            raise ValueError("the temporal VAE's input must be the 2D VAE's latent")
        self.cfg = cfg
        self.name = "opensora-vae-1.2"
        self.latent_channels = cfg.latent_channels
        self.spatial_vae = SpatialVAE(cfg.spatial, cfg.micro_batch_size)
        self.temporal_vae = TemporalVAE(cfg.temporal)
        c = cfg.latent_channels
        self.register_buffer(
            "scale", torch.tensor(cfg.scale, dtype=torch.float32).view(1, c, 1, 1, 1)
        )
        self.register_buffer(
            "shift", torch.tensor(cfg.shift, dtype=torch.float32).view(1, c, 1, 1, 1)
        )
        # UPSTREAM: the normalisation runs in the model dtype with scale and shift rounded
        # to it, as upstream's pipeline (whose buffers are cast with the model) does; EXACT:
        # in float32. The buffers themselves stay float32 either way.
        self.numerics = Numerics.EXACT

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, scale, shift) in the dtype the normalisation runs in."""
        dtype = self.dtype if self.numerics is Numerics.UPSTREAM else torch.float32
        return like.to(dtype), self.scale.to(dtype), self.shift.to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.temporal_vae.quant_conv.conv.weight.dtype

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, h, w): 51 × 240 × 426 → (4, 15, 30, 53). InputError if unsupported."""
        f = self.cfg.spatial.spatial_factor
        if frames < 1:
            raise InputError(f"frames must be at least 1, not {frames}")
        if height < f or width < f:
            raise InputError(f"height and width must be at least {f}, not {height}x{width}")
        return (self.latent_channels, self.cfg.latent_frames(frames), height // f, width // f)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Video (B, 3, F, H, W) in [-1, 1] → normalised latent (B, 4, T, H/8, W/8), fp32."""
        _, _, frames, h, w = video.shape
        self.latent_shape(frames, h, w)
        # 1. the 2D VAE, frame by frame
        x = self.spatial_vae.encode(video.to(self.dtype), generator)  # (B, 4, F, h, w)
        # 2. the temporal VAE, chunk by chunk
        out, start = [], 0
        for n in self.cfg.chunk_frames(frames):
            chunk = x[:, :, start : start + n]
            out.append(self.temporal_vae.encode(chunk, self.cfg.logvar_range, generator))
            start += n
        z, scale, shift = self._stats(torch.cat(out, dim=2))
        # 3. per-channel normalisation
        return ((z - shift) / scale).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor, frames: int) -> torch.Tensor:
        """Normalised latent (B, 4, T, h, w) → video (B, 3, frames, 8h, 8w) in [-1, 1], fp32.

        Raises InputError when T is not the latent length of ``frames`` frames.
        """
        expected = self.cfg.latent_frames(frames) if frames >= 1 else -1
        if z.shape[2] != expected:
            raise InputError(
                f"a latent of {z.shape[2]} frames does not decode to {frames} video frames"
            )
        # 1. undo the normalisation
        z, scale, shift = self._stats(z)
        z = (z * scale + shift).to(self.dtype)
        # 2. the temporal VAE, chunk by chunk (17 frames from 5 latents)
        tf = self.cfg.temporal.time_factor
        out, start = [], 0
        for n in self.cfg.chunk_frames(frames):
            length = -(-n // tf)
            interrupt.point()
            out.append(self.temporal_vae.decode(z[:, :, start : start + length], n))
            start += length
        x = torch.cat(out, dim=2)  # (B, 4, frames, h, w)
        # 3. the 2D VAE, frame by frame
        return self.spatial_vae.decode(x).float().clamp(-1, 1)


def build_opensora_vae(
    cfg: OpenSoraVAEConfig | None = None,
    weights: str | Path | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    numerics: Numerics | str = Numerics.EXACT,
) -> OpenSoraVAE:
    """VAE v1.2 with weights loaded strictly from ``weights`` (a directory with
    model.safetensors or the file), or seeded random weights; "meta" builds shapes only.

    ``scale`` and ``shift`` are stored in fp32 whatever ``dtype`` is; ``numerics`` says
    in which dtype the normalisation runs (see ``OpenSoraVAE.numerics``).

    Raises:
        WeightsError: missing, unexpected or wrongly shaped tensors (all named).
    """
    device = torch.device(device)
    if weights is not None:
        if device.type == "meta":
            raise WeightsError("cannot load weights onto the meta device")
        with torch.device("meta"):
            vae = OpenSoraVAE(cfg)
        load_weights(vae, weights, device=device, dtype=dtype)
        vae.scale.data = vae.scale.data.float()
        vae.shift.data = vae.shift.data.float()
        vae.numerics = Numerics(numerics)
        return vae.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("meta" if device.type == "meta" else "cpu"):
            vae = OpenSoraVAE(cfg)
    vae = vae.to(device=device, dtype=dtype)
    if device.type != "meta":
        vae.scale.data = vae.scale.data.float()
        vae.shift.data = vae.shift.data.float()
    vae.numerics = Numerics(numerics)
    return vae.eval()


def parameter_bytes(module: nn.Module, bytes_per_element: int = 4) -> int:
    """Bytes of the module's state dict at a given element size (fp32: 4)."""
    return sum(math.prod(t.shape) for t in module.state_dict().values()) * bytes_per_element
