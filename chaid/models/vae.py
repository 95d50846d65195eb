"""Video autoencoders: pixels (B, 3, F, H, W) in [-1, 1] ↔ latents (B, C, T, h, w).

The pipeline sees only :class:`VideoAutoencoder`: it asks for the latent shape of a video
size (which also validates the size), encodes, and decodes.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from chaid.errors import InputError


class VideoAutoencoder(Protocol):
    name: str
    latent_channels: int

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, h, w) of the latent for a video of this size; InputError if unsupported."""
        ...

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor, frames: int) -> torch.Tensor:
        """Latents → video of ``frames`` frames (B, 3, frames, H, W) in [-1, 1]."""
        ...


# RGB → (luma, blue-difference, red-difference): an orthogonal colour basis (BT.601 weights).
_RGB_TO_YCC = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)


class PoolingAutoencoder:
    """A fixed, non-learned autoencoder: average-pool space, change colour basis.

    Latent channels are luma, two colour differences and local luma contrast (the standard
    deviation of luma inside each pooled cell), so 4 channels as the DiT expects. Decoding
    inverts the colour basis and upsamples bilinearly; detail finer than the pooling cell
    is lost. Frames map one to one to latent frames. It lets a small config run end to end
    with no trained VAE.
    """

    latent_channels = 4

    def __init__(self, spatial_factor: int = 8) -> None:
        self.factor = spatial_factor
        self.name = f"pool-{spatial_factor}"

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.factor
        if frames < 1:
            raise InputError(f"frames must be at least 1, not {frames}")
        if height < f or width < f or height % f or width % f:
            raise InputError(
                f"height and width must be positive multiples of {f}, not {height}x{width}"
            )
        return (self.latent_channels, frames, height // f, width // f)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        b, _, n, h, w = video.shape
        self.latent_shape(n, h, w)
        ycc = torch.einsum("kc,bcfhw->bkfhw", _RGB_TO_YCC.to(video), video)
        pooled = F.avg_pool3d(ycc, (1, self.factor, self.factor))
        luma_sq = F.avg_pool3d(ycc[:, :1] ** 2, (1, self.factor, self.factor))
        contrast = (luma_sq - pooled[:, :1] ** 2).clamp_min(0).sqrt()
        return torch.cat([pooled, contrast], dim=1)  # (B, 4, F, h, w)

    def decode(self, z: torch.Tensor, frames: int) -> torch.Tensor:
        b, _, t, h, w = z.shape
        ycc = z[:, :3].float()
        rgb = torch.einsum("kc,bcfhw->bkfhw", torch.linalg.inv(_RGB_TO_YCC).to(ycc), ycc)
        rgb = F.interpolate(
            rgb.transpose(1, 2).reshape(b * t, 3, h, w),
            scale_factor=self.factor,
            mode="bilinear",
            align_corners=False,
        )
        rgb = rgb.view(b, t, 3, h * self.factor, w * self.factor).transpose(1, 2)
        return rgb[:, :, :frames].clamp(-1, 1)
