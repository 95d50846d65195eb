"""A small learned video autoencoder for the Shapes world: 4 latent channels, space ×8, time ×2.

Pixels (B, 3, F, H, W) in [-1, 1] ↔ latents (B, 4, ceil(F/2), H/8, W/8). At the embedded
default's size, 16 frames of 64×64 become a latent of (4, 8, 8, 8): 512 tokens of 4 channels
for the DiT's 1×2×2 patches to turn into 128.

Most of the work is per frame, in 2D: a pixel unshuffle (space-to-depth ×4) so no convolution
runs at full resolution, residual blocks at 16×16 and 8×8, and one strided 3D convolution that
folds pairs of frames into one latent frame. The decoder mirrors it: two 3D convolutions unfold
each latent frame into two, 2D blocks upsample to 16×16, and a pixel shuffle gives 64×64.

Training (:mod:`chaid_lab.shapes.train_vae`) is that of a KL autoencoder with a small KL weight,
so the latent is smooth around the encoder's mean. :meth:`ShapesVAE.encode` returns the mean,
shifted and scaled per channel to about zero mean and unit variance (the statistics are
buffers saved with the weights): the DiT's rectified flow assumes latents of that scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from chaid import interrupt
from chaid.errors import InputError

# Where the trained weights of the embedded default live, inside the package.
SHAPES_VAE_WEIGHTS = Path(__file__).resolve().parent / "data" / "tiny-shapes" / "vae.safetensors"


# Initial log-variance of the encoder's posterior.
INITIAL_LOGVAR = -6.0


@dataclass(frozen=True)
class ShapesVAEConfig:
    # Latent channels: the DiT's in_channels.
    latent_channels: int = 4
    # Space-to-depth factor before the first convolution: larger skips costly full-resolution
    # convolutions, smaller keeps finer edges in the network's hands.
    unshuffle: int = 4
    # Widths at 16×16 and at 8×8 (for 64×64 input): compute grows with their square.
    width_high: int = 48
    width_low: int = 96
    # Residual blocks per resolution in the decoder (the encoder has one): decoding is
    # where detail is invented, so that is where capacity pays.
    decoder_blocks: int = 2
    # Frames folded into one latent frame.
    temporal_factor: int = 2
    # GroupNorm groups; widths must be multiples of it.
    groups: int = 16

    @property
    def spatial_factor(self) -> int:
        return self.unshuffle * 2


class ResBlock2d(nn.Module):
    def __init__(self, width: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))  # (N, C, H, W)


def _frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    b, c, f, h, w = x.shape
    return x.transpose(1, 2).reshape(b * f, c, h, w)  # (B*F, C, H, W)


def _batch_to_frames(x: torch.Tensor, b: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(b, n // b, c, h, w).transpose(1, 2)  # (B, C, F, H, W)


class Encoder(nn.Module):
    def __init__(self, cfg: ShapesVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hi, lo, g = cfg.width_high, cfg.width_low, cfg.groups
        self.conv_in = nn.Conv2d(3 * cfg.unshuffle**2, hi, 3, padding=1)
        self.block_high = ResBlock2d(hi, g)
        self.down = nn.Conv2d(hi, lo, 3, stride=2, padding=1)
        self.block_low = ResBlock2d(lo, g)
        # Folds temporal_factor frames into one: kernel spans the pair and a frame either side.
        self.fold_time = nn.Conv3d(
            lo,
            lo,
            (cfg.temporal_factor + 1, 3, 3),
            stride=(cfg.temporal_factor, 1, 1),
            padding=(1, 1, 1),
        )
        self.norm_out = nn.GroupNorm(g, lo)
        self.conv_out = nn.Conv3d(lo, 2 * cfg.latent_channels, 1)
        # Start nearly deterministic (posterior std e^-3): with unit noise at the start the
        # decoder sees mostly noise, and a short CPU training run never recovers the time.
        with torch.no_grad():
            self.conv_out.bias[cfg.latent_channels :].fill_(INITIAL_LOGVAR)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        h = F.pixel_unshuffle(_frames_to_batch(x), self.cfg.unshuffle)  # (B*F, 48, H/4, W/4)
        h = self.block_high(self.conv_in(h))
        h = self.block_low(self.down(h))  # (B*F, lo, H/8, W/8)
        h = self.fold_time(_batch_to_frames(h, b))  # (B, lo, F/2, H/8, W/8)
        h = self.conv_out(F.silu(self.norm_out(h)))
        mean, logvar = h.chunk(2, dim=1)  # (B, C, T, h, w) each
        return mean, logvar


class Decoder(nn.Module):
    def __init__(self, cfg: ShapesVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hi, lo, g = cfg.width_high, cfg.width_low, cfg.groups
        self.conv_in = nn.Conv3d(cfg.latent_channels, lo, 3, padding=1)
        # Unfolds each latent frame into temporal_factor frames (channels → time).
        self.unfold_time = nn.Conv3d(lo, lo * cfg.temporal_factor, 3, padding=1)
        self.blocks_low = nn.Sequential(*(ResBlock2d(lo, g) for _ in range(cfg.decoder_blocks)))
        self.up = nn.Conv2d(lo, hi, 3, padding=1)
        self.blocks_high = nn.Sequential(*(ResBlock2d(hi, g) for _ in range(cfg.decoder_blocks)))
        self.norm_out = nn.GroupNorm(g, hi)
        self.conv_out = nn.Conv2d(hi, 3 * cfg.unshuffle**2, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = z.shape
        k = self.cfg.temporal_factor
        x = self.unfold_time(F.silu(self.conv_in(z)))  # (B, lo*k, T, h, w)
        x = x.view(b, -1, k, t, h, w).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, t * k, h, w)
        interrupt.point()
        x = self.blocks_low(_frames_to_batch(x))  # (B*F, lo, h, w)
        interrupt.point()
        x = self.up(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        x = self.blocks_high(x)
        interrupt.point()
        x = self.conv_out(F.silu(self.norm_out(x)))  # (B*F, 48, 2h, 2w)
        return _batch_to_frames(F.pixel_shuffle(x, self.cfg.unshuffle), b)  # (B, 3, F, H, W)


class ShapesVAE(nn.Module):
    """The Shapes world's video autoencoder; implements the VideoAutoencoder protocol.

    Any frame count works (an odd count repeats the last frame to fill the last pair, and
    decoding drops it); height and width must be positive multiples of 8. Inputs may be on
    any device and dtype: they are moved to the module's, and outputs return to the input's
    device.
    """

    def __init__(self, cfg: ShapesVAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ShapesVAEConfig()
        self.name = "shapes-vae"
        self.latent_channels = self.cfg.latent_channels
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)
        # Per-channel statistics of the encoder's mean over training renders:
        # latent = (mean - shift) / scale. Identity until fitted.
        self.register_buffer("latent_shift", torch.zeros(self.cfg.latent_channels))
        self.register_buffer("latent_scale", torch.ones(self.cfg.latent_channels))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        s, k = self.cfg.spatial_factor, self.cfg.temporal_factor
        if frames < 1:
            raise InputError(f"frames must be at least 1, not {frames}")
        if height < s or width < s or height % s or width % s:
            raise InputError(
                f"height and width must be positive multiples of {s}, not {height}x{width}"
            )
        return (self.latent_channels, math.ceil(frames / k), height // s, width // s)

    def _pad_frames(self, video: torch.Tensor) -> torch.Tensor:
        extra = -video.shape[2] % self.cfg.temporal_factor
        if extra:
            video = torch.cat([video, video[:, :, -1:].expand(-1, -1, extra, -1, -1)], dim=2)
        return video

    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (un-normalised) posterior mean and log-variance; for training."""
        return self.encoder(self._pad_frames(video))

    def normalise(self, mean: torch.Tensor) -> torch.Tensor:
        view = (1, -1, 1, 1, 1)
        return (mean - self.latent_shift.view(view)) / self.latent_scale.view(view)

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        view = (1, -1, 1, 1, 1)
        return z * self.latent_scale.view(view) + self.latent_shift.view(view)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video (B, 3, F, H, W) in [-1, 1] → normalised latent (B, 4, ceil(F/2), H/8, W/8)."""
        self.latent_shape(video.shape[2], video.shape[3], video.shape[4])
        param = self.latent_shift
        x = video.to(device=param.device, dtype=torch.float32)
        with torch.no_grad():
            mean, _ = self.encode_moments(x)
            return self.normalise(mean).to(video.device)

    def decode_raw(self, mean: torch.Tensor, frames: int) -> torch.Tensor:
        """Un-normalised latent → video, unclamped; for training."""
        return self.decoder(mean)[:, :, :frames]

    def decode(self, z: torch.Tensor, frames: int) -> torch.Tensor:
        """Normalised latent → video (B, 3, frames, H, W) in [-1, 1]."""
        t = z.shape[2]
        if not 1 <= frames <= t * self.cfg.temporal_factor:
            raise InputError(f"a latent of {t} frames decodes to 1..{2 * t} frames, not {frames}")
        param = self.latent_shift
        with torch.no_grad():
            x = self.denormalise(z.to(device=param.device, dtype=torch.float32))
            return self.decode_raw(x, frames).clamp(-1, 1).to(z.device)


def load_shapes_vae(
    path: str | Path | None = None, cfg: ShapesVAEConfig | None = None
) -> ShapesVAE:
    """The trained Shapes VAE on the CPU in fp32, in eval mode (default: the shipped weights).

    Raises WeightsError if the file is missing or does not match the architecture ``cfg``.
    """
    from chaid.models.weights import load_weights

    with torch.device("meta"):
        vae = ShapesVAE(cfg)
    load_weights(vae, path or SHAPES_VAE_WEIGHTS, device="cpu", dtype=torch.float32)
    return vae.eval().requires_grad_(False)
