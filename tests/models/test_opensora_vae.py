"""VAE v1.2: chunk arithmetic, round-trip shapes, causality, checkpoint layout and loading."""

import pytest
import torch
from safetensors.torch import save_file

from chaid.errors import InputError, WeightsError
from chaid.models.opensora_vae import (
    CausalConv3d,
    OpenSoraVAEConfig,
    SpatialVAEConfig,
    TemporalVAEConfig,
    build_opensora_vae,
    parameter_bytes,
)
from chaid.models.weights import save_weights

# The released file is 1.57 GB of fp32 tensors (reference/opensora-1.2.md).
RELEASED_BYTES = 1.57e9

TINY = OpenSoraVAEConfig(
    spatial=SpatialVAEConfig(
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4
    ),
    temporal=TemporalVAEConfig(filters=8, num_res_blocks=1, num_groups=4),
)


@pytest.fixture(scope="module")
def full_meta():
    return build_opensora_vae(device="meta")


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return build_opensora_vae(TINY, seed=1)


def _video(frames, h=32, w=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, h, w, generator=gen) * 2 - 1


def test_chunk_arithmetic():
    cfg = OpenSoraVAEConfig()
    assert cfg.chunk_frames(51) == [17, 17, 17]
    assert cfg.chunk_frames(40) == [17, 17, 6]
    assert [cfg.latent_frames(n) for n in (1, 4, 5, 17, 40, 51, 102)] == [1, 1, 2, 5, 12, 15, 30]


@pytest.mark.parametrize(
    ("frames", "height", "width", "shape"),
    [
        (51, 240, 426, (4, 15, 30, 53)),
        (102, 240, 426, (4, 30, 30, 53)),
        (51, 360, 640, (4, 15, 45, 80)),
        (102, 480, 854, (4, 30, 60, 106)),
    ],
)
def test_latent_shapes_of_the_supported_sizes(full_meta, frames, height, width, shape):
    assert full_meta.latent_shape(frames, height, width) == shape


def test_latent_shape_rejects_empty_and_tiny_videos(full_meta):
    with pytest.raises(InputError):
        full_meta.latent_shape(0, 240, 426)
    with pytest.raises(InputError):
        full_meta.latent_shape(51, 4, 426)


def test_full_size_layout_matches_the_released_checkpoint(full_meta):
    state = full_meta.state_dict()
    prefixes = {k.split(".")[0] for k in state}
    assert prefixes == {"spatial_vae", "temporal_vae", "scale", "shift"}
    assert all(k.startswith("spatial_vae.module.") for k in state if k.startswith("spatial_"))
    assert tuple(state["scale"].shape) == tuple(state["shift"].shape) == (1, 4, 1, 1, 1)
    # names of the temporal VAE (CausalConv3d holds its Conv3d as .conv)
    for name, shape in {
        "temporal_vae.encoder.conv_in.conv.weight": (128, 4, 3, 3, 3),
        "temporal_vae.encoder.block_res_blocks.1.0.conv3.conv.weight": (256, 128, 1, 1, 1),
        "temporal_vae.encoder.conv_blocks.1.conv.weight": (256, 256, 3, 3, 3),
        "temporal_vae.encoder.conv2.conv.weight": (8, 512, 1, 1, 1),
        "temporal_vae.quant_conv.conv.weight": (8, 8, 1, 1, 1),
        "temporal_vae.post_quant_conv.conv.weight": (4, 4, 1, 1, 1),
        "temporal_vae.decoder.conv1.conv.weight": (512, 4, 3, 3, 3),
        "temporal_vae.decoder.conv_blocks.2.conv.weight": (1024, 512, 3, 3, 3),
        "temporal_vae.decoder.conv_blocks.1.conv.weight": (512, 256, 3, 3, 3),
        "temporal_vae.decoder.conv_out.conv.weight": (4, 128, 3, 3, 3),
        "spatial_vae.module.encoder.conv_in.weight": (128, 3, 3, 3),
        "spatial_vae.module.quant_conv.weight": (8, 8, 1, 1),
    }.items():
        assert tuple(state[name].shape) == shape, name
    # no parameters where time is not resampled (level 0 → 1)
    assert not any(k.startswith("temporal_vae.encoder.conv_blocks.0.") for k in state)
    assert not any(k.startswith("temporal_vae.decoder.conv_blocks.0.") for k in state)
    # 2D part: the SDXL VAE's 83.65 M parameters; in all, the released file's size
    spatial = sum(v.numel() for k, v in state.items() if k.startswith("spatial_vae."))
    assert spatial == 83_653_863
    assert abs(parameter_bytes(full_meta) - RELEASED_BYTES) < 0.01e9


def test_round_trip_shapes(tiny):
    video = _video(20)  # chunks of 17 and 3 frames → 5 + 1 latent frames
    z = tiny.encode(video)
    assert z.shape == (1, 4, 6, 4, 6) == (1, *tiny.latent_shape(20, 32, 48))
    out = tiny.decode(z, 20)
    assert out.shape == video.shape and out.dtype == torch.float32
    assert out.abs().max() <= 1 and torch.isfinite(out).all()
    with pytest.raises(InputError, match="does not decode"):
        tiny.decode(z, 17)


def test_normalisation_is_per_channel(tiny):
    video = _video(5)
    z = tiny.encode(video)
    scale = torch.tensor(TINY.scale).view(1, 4, 1, 1, 1)
    shift = torch.tensor(TINY.shift).view(1, 4, 1, 1, 1)
    x = tiny.spatial_vae.encode(video)
    raw = tiny.temporal_vae.encode(x, TINY.logvar_range)
    assert torch.allclose(z, (raw - shift) / scale, atol=1e-5)


def test_chunks_are_encoded_and_decoded_independently(tiny):
    video = _video(34)
    changed = video.clone()
    changed[:, :, 20] = -changed[:, :, 20]  # a frame of the second chunk
    z, z2 = tiny.encode(video), tiny.encode(changed)
    assert torch.equal(z[:, :, :5], z2[:, :, :5])
    assert not torch.allclose(z[:, :, 5:], z2[:, :, 5:])
    latent = torch.randn(1, 4, 10, 4, 6, generator=torch.Generator().manual_seed(3))
    other = latent.clone()
    other[:, :, 7] += 1
    a, b = tiny.decode(latent, 34), tiny.decode(other, 34)
    assert torch.equal(a[:, :, :17], b[:, :, :17])


def test_causal_conv_sees_only_the_past():
    gen = torch.Generator().manual_seed(0)
    for stride in (1, 2):
        torch.manual_seed(0)
        conv = CausalConv3d(2, 3, 3, time_stride=stride)
        x = torch.randn(1, 2, 8, 5, 5, generator=gen)
        y = conv(x)
        assert y.shape == (1, 3, 8 // stride, 5, 5)
        x2 = x.clone()
        x2[:, :, 5:] = torch.randn(1, 2, 3, 5, 5, generator=gen)
        y2 = conv(x2)
        # output frame t covers input frames up to t*stride + stride - 1
        last_unchanged = 5 // stride
        assert torch.equal(y[:, :, :last_unchanged], y2[:, :, :last_unchanged])
        assert not torch.allclose(y, y2)


def test_first_latent_frame_depends_only_on_the_first_frame_through_the_convolutions():
    """With GroupNorm out of the way (one frame of padding would change the statistics),
    the temporal encoder's convolutions map a chunk's first frame alone to latent 0."""
    torch.manual_seed(0)
    cfg = TemporalVAEConfig(filters=8, num_res_blocks=1, num_groups=4)
    from chaid.models.opensora_vae import TemporalVAE

    vae = TemporalVAE(cfg).eval()
    for m in vae.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.forward = lambda x: x  # noqa: B023 (identity on purpose)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 17, 4, 4, generator=gen)
    x2 = x.clone()
    x2[:, :, 1:] = torch.randn(1, 4, 16, 4, 4, generator=gen)
    with torch.no_grad():
        a = vae.encode(x, (-30.0, 20.0))
        b = vae.encode(x2, (-30.0, 20.0))
    assert a.shape == (1, 4, 5, 4, 4)
    assert torch.equal(a[:, :, 0], b[:, :, 0])
    assert not torch.allclose(a[:, :, 1:], b[:, :, 1:])


def test_saved_random_checkpoint_loads_strictly(tmp_path, tiny):
    path = save_weights(tiny, tmp_path / "vae")
    loaded = build_opensora_vae(TINY, tmp_path / "vae")
    src_state, new_state = tiny.state_dict(), loaded.state_dict()
    assert set(src_state) == set(new_state)
    assert all(torch.equal(src_state[k], new_state[k]) for k in src_state)
    latent = torch.randn(1, 4, 5, 4, 6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(tiny.decode(latent, 17), loaded.decode(latent, 17))
    # a missing tensor is named
    state = {k: v.contiguous() for k, v in src_state.items()}
    del state["temporal_vae.decoder.conv_out.conv.bias"]
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match=r"missing: temporal_vae\.decoder\.conv_out\.conv\.bias"):
        build_opensora_vae(TINY, tmp_path / "bad.safetensors")
    assert path.name == "model.safetensors"


def test_bfloat16_keeps_the_statistics_in_float32(tmp_path, tiny):
    save_weights(tiny, tmp_path / "vae")
    loaded = build_opensora_vae(TINY, tmp_path / "vae", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.scale.dtype == torch.float32
    z = loaded.encode(_video(5))
    assert z.dtype == torch.float32 and z.shape == (1, 4, 2, 4, 6)
