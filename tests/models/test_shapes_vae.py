"""The Shapes VAE of the tiny-shapes preset: geometry, round trips, its weights."""

from __future__ import annotations

import pytest
import torch

from chaid.errors import InputError
from chaid.models.shapes_vae import (
    SHAPES_VAE_WEIGHTS,
    ShapesVAE,
    ShapesVAEConfig,
    load_shapes_vae,
)
from chaid.models.weights import save_weights

# A narrow copy of the architecture: the same code paths, a fraction of the compute.
TINY = ShapesVAEConfig(width_high=16, width_low=16, groups=8)

# Every test here runs with one torch thread (see the root conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_vae() -> ShapesVAE:
    torch.manual_seed(0)
    return ShapesVAE(TINY).eval()


def test_latent_geometry_of_the_embedded_default(tiny_vae):
    assert tiny_vae.latent_shape(16, 64, 64) == (4, 8, 8, 8)
    assert tiny_vae.latent_shape(15, 32, 48) == (4, 8, 4, 6)
    for frames, h, w in [(0, 64, 64), (16, 60, 64), (16, 64, 4)]:
        with pytest.raises(InputError):
            tiny_vae.latent_shape(frames, h, w)


@pytest.mark.parametrize("frames", [16, 15, 1])
def test_encode_decode_shapes_and_range(tiny_vae, frames):
    video = torch.rand(2, 3, frames, 32, 32) * 2 - 1
    z = tiny_vae.encode(video)
    assert z.shape == (2, *tiny_vae.latent_shape(frames, 32, 32))
    out = tiny_vae.decode(z, frames)
    assert out.shape == video.shape
    assert out.min() >= -1 and out.max() <= 1
    with pytest.raises(InputError):
        tiny_vae.decode(z, 2 * z.shape[2] + 1)


def test_encode_is_deterministic_and_batch_independent(tiny_vae):
    video = torch.rand(3, 3, 4, 16, 16) * 2 - 1
    z = tiny_vae.encode(video)
    assert torch.equal(z, tiny_vae.encode(video))
    torch.testing.assert_close(tiny_vae.encode(video[1:2]), z[1:2], rtol=1e-4, atol=1e-5)


def test_weights_round_trip_keeps_latent_statistics(tiny_vae, tmp_path):
    vae = ShapesVAE(TINY)
    vae.load_state_dict(tiny_vae.state_dict())
    vae.latent_shift.fill_(0.5)
    vae.latent_scale.fill_(2.0)
    path = save_weights(vae, tmp_path / "vae.safetensors")
    loaded = load_shapes_vae(path, TINY)
    assert torch.equal(loaded.latent_scale, vae.latent_scale)
    video = torch.rand(1, 3, 4, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded.encode(video), vae.eval().encode(video))


@pytest.mark.skipif(not SHAPES_VAE_WEIGHTS.is_file(), reason="no shipped VAE weights")
def test_tiny_shapes_preset_uses_the_shipped_vae_and_minilm():
    from chaid.models import get_spec
    from chaid.models.text import MiniLMTextEncoder

    spec = get_spec("tiny-shapes")
    vae = spec.vae()
    assert isinstance(vae, ShapesVAE)
    assert vae.latent_shape(spec.frames, spec.height, spec.width) == (4, 8, 8, 8)
    encoder = spec.text_encoder(spec.dit)
    assert isinstance(encoder, MiniLMTextEncoder)
    assert (encoder.dim, encoder.max_length) == (384, 32)

