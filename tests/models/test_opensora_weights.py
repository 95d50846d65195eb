"""OpenSora 1.2 from a weights directory: the documented layout, loading through the real
loaders, `chaid models verify` (full-size headers included), sizes and timestep transform."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_opensora_t5 import make_tiny_t5  # pytest puts tests/models on sys.path

from chaid.cli import main
from chaid.engine.pipeline import GenerationRequest, Pipeline
from chaid.engine.sampler import schedule, transform_ratio
from chaid.errors import WeightsError
from chaid.models import build_model, build_parts, get_spec
from chaid.models.opensora import DURATIONS, RESOLUTIONS, missing_files, verify
from chaid.models.opensora_vae import build_opensora_vae
from chaid.models.t5 import T5TextEncoder
from chaid.models.weights import model_shapes, save_weights

TINY = "opensora-tiny"


def make_weights_dir(root: Path, seed: int = 0) -> Path:
    """Random weights of the opensora-tiny preset in the documented layout."""
    spec = get_spec(TINY)
    dit = build_model(TINY, seed=seed)
    save_weights(dit, root / "stdit")
    (root / "stdit" / "config.json").write_text(
        json.dumps({"hidden_size": spec.dit.hidden_size, "depth": spec.dit.depth})
    )
    save_weights(build_opensora_vae(spec.opensora_vae, seed=seed), root / "vae")
    make_tiny_t5(root / "t5", d_model=spec.dit.caption_channels, seed=seed)
    return root


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return make_weights_dir(tmp_path_factory.mktemp("opensora"))


def _write_header_only(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "F32"):
    """A safetensors file with these tensors whose data region is a hole: the header is
    real and the size right, so a header-only check sees the full-size checkpoint."""
    size = {"F32": 4, "BF16": 2}[dtype]
    header, offset = {}, 0
    for name in sorted(shapes):
        n = math.prod(shapes[name]) * size
        header[name] = {
            "dtype": dtype,
            "shape": list(shapes[name]),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        fh.truncate(8 + len(raw) + offset)


# -- layout and loading --------------------------------------------------------------------


def test_build_parts_loads_every_part_from_the_directory(weights_dir):
    parts = build_parts(TINY, weights_dir)
    assert isinstance(parts.text_encoder, T5TextEncoder) and parts.text_encoder.loaded
    assert parts.vae.name == "opensora-vae-1.2"
    # the DiT came from stdit/ (the saved seed-0 weights), not a fresh initialisation
    saved = build_model(TINY, seed=0).state_dict()
    other = build_model(TINY, seed=5).state_dict()
    got = parts.dit.state_dict()
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    assert any(not torch.equal(got[k], other[k]) for k in saved)
    # build_model takes the directory too
    alone = build_model(TINY, weights=weights_dir).state_dict()
    assert all(torch.equal(alone[k], saved[k]) for k in saved)
    # and the daemon's model fingerprint digests the DiT file inside it
    from chaid.engine.chai import model_fingerprint

    fingerprint = model_fingerprint(parts, str(weights_dir))
    assert fingerprint.startswith(f"{TINY}-")
    assert fingerprint == model_fingerprint(parts, str(weights_dir / "stdit"))


def test_generation_end_to_end_on_the_cpu(weights_dir):
    pipeline = Pipeline(build_parts(TINY, weights_dir), torch.device("cpu"))
    result = pipeline.generate(GenerationRequest("A red fox in the snow", steps=2, seed=1))
    assert result.latent.shape == (4, 5, 8, 12)  # 17 frames, 64 x 96
    assert result.video.shape == (17, 64, 96, 3)


def test_numerics_default_to_upstream_and_reach_every_part(weights_dir):
    """opensora presets run as upstream's bf16 inference unless told otherwise: the DiT's
    timestep cast and rotary rounding, the VAE's normalisation, the bf16-rounded noise and
    upstream's schedule (20 frames: upstream counts 20 // 17 * 5 = 5 latent frames, the VAE
    makes 6)."""
    from chaid.config import ModelSettings, Settings
    from chaid.engine.sampler import run_schedule
    from chaid.numerics import Numerics

    def run(numerics):
        parts = build_parts(TINY, weights_dir, dtype=torch.bfloat16, numerics=numerics)
        pipeline = Pipeline(parts, torch.device("cpu"))
        seen = []
        request = pipeline.resolve(GenerationRequest("a fox", steps=3, seed=2, frames=20))
        noise = pipeline.initial_noise(request)
        result = pipeline.generate(request, on_step=lambda k, t, z: seen.append(t))
        return parts, noise, seen, result.latent

    parts, noise, seen, latent = run(None)
    assert parts.numerics is Numerics.UPSTREAM and parts.dit.numerics is Numerics.UPSTREAM
    assert parts.vae.numerics is Numerics.UPSTREAM and parts.dit.rope.in_input_dtype
    assert torch.equal(noise, noise.bfloat16().float())
    assert seen == run_schedule(3, height=64, width=96, frames=20, latent_frames=6,
                                numerics=Numerics.UPSTREAM, size_dtype=torch.bfloat16)
    assert seen == run_schedule(3, height=64, width=96, frames=17, latent_frames=5,
                                numerics=Numerics.UPSTREAM, size_dtype=torch.bfloat16)
    exact_parts, exact_noise, exact_seen, exact_latent = run("exact")
    assert exact_parts.vae.numerics is Numerics.EXACT and not torch.equal(noise, exact_noise)
    assert exact_seen == schedule(3, transform_ratio(64, 96, 6, 512))
    assert exact_seen[1] != pytest.approx(seen[1], abs=1.0)
    assert (latent - exact_latent).abs().max() > 1e-3
    # the setting: "auto" is the preset's, anything else is refused by name
    assert Settings().model.numerics == "auto"
    with pytest.raises(Exception, match="model.numerics"):
        Settings(model=ModelSettings(numerics="fast")).validate()


def test_missing_parts_are_all_listed(tmp_path, weights_dir):
    partial = tmp_path / "partial"
    (partial / "stdit").mkdir(parents=True)
    (partial / "stdit" / "model.safetensors").write_bytes(
        (weights_dir / "stdit" / "model.safetensors").read_bytes()
    )
    (partial / "t5").mkdir()
    (partial / "t5" / "config.json").write_text((weights_dir / "t5" / "config.json").read_text())
    with pytest.raises(WeightsError) as info:
        build_parts(TINY, partial)
    message = str(info.value)
    assert "vae/model.safetensors" in message and "t5/ weights" in message
    assert "t5/ tokenizer" in message and "stdit/" not in message.split("missing:")[1]
    with pytest.raises(WeightsError, match="needs --weights DIR"):
        build_parts("opensora-1.2")
    assert missing_files(weights_dir) == []


# -- verify ----------------------------------------------------------------------------------


def test_verify_accepts_the_saved_directory(weights_dir, capsys):
    spec = get_spec(TINY)
    report = verify(weights_dir, spec.dit, spec.opensora_vae)
    assert report["ok"], report
    assert [p["part"] for p in report["parts"]] == ["stdit", "vae", "t5"]
    assert main(["models", "verify", str(weights_dir), "--model", TINY, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["ok"] and printed["parts"][0]["tensors"] == len(
        model_shapes(build_model(TINY, device="meta"))
    )
    assert main(["models", "verify", str(weights_dir), "--model", TINY]) == 0
    assert "stdit  ok" in capsys.readouterr().out


def test_verify_names_every_problem(tmp_path, weights_dir):
    spec = get_spec(TINY)
    bad = tmp_path / "bad"
    for part in ("stdit", "vae", "t5"):
        (bad / part).mkdir(parents=True)
        for f in (weights_dir / part).iterdir():
            (bad / part / f.name).write_bytes(f.read_bytes())
    # a truncated VAE download, a DiT of another config, a T5 of the wrong width
    vae_file = bad / "vae" / "model.safetensors"
    vae_file.write_bytes(vae_file.read_bytes()[:-100])
    save_weights(build_model(TINY, depth=3), bad / "stdit")
    t5_config = json.loads((bad / "t5" / "config.json").read_text())
    (bad / "t5" / "config.json").write_text(json.dumps({**t5_config, "d_model": 48}))
    (bad / "stdit" / "config.json").write_text(json.dumps({"depth": 28}))
    report = verify(bad, spec.dit, spec.opensora_vae)
    assert not report["ok"]
    problems = {p["part"]: " ".join(p["problems"]) for p in report["parts"]}
    assert "interrupted download" in problems["vae"]
    assert "unexpected" in problems["stdit"] and "spatial_blocks.2" in problems["stdit"]
    assert "config.json depth is 28" in problems["stdit"]
    assert "d_model is 48" in problems["t5"]
    assert main(["models", "verify", str(bad), "--model", TINY]) == 1


def test_verify_full_size_headers(tmp_path, shared_dir):
    """Full-size checkpoints, as headers over holes: the DiT from the reference manifest,
    the VAE from its meta model (1.57 GB), T5-XXL's encoder from its meta model."""
    from transformers import T5Config, T5EncoderModel

    manifest = json.loads((shared_dir / "reference" / "stdit3_xl2_keys.json").read_text())
    _write_header_only(
        tmp_path / "stdit" / "model.safetensors", {k: tuple(v) for k, v in manifest["keys"].items()}
    )
    vae_shapes = model_shapes(build_opensora_vae(device="meta"))
    _write_header_only(tmp_path / "vae" / "model.safetensors", vae_shapes)
    xxl = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    (tmp_path / "t5").mkdir()
    xxl.save_pretrained(tmp_path / "t5")
    with torch.device("meta"):
        t5_shapes = model_shapes(T5EncoderModel(xxl))
    t5_shapes.pop("encoder.embed_tokens.weight")
    t5_shapes["decoder.final_layer_norm.weight"] = (4096,)  # a decoder tensor: ignored
    _write_header_only(tmp_path / "t5" / "model.safetensors", t5_shapes, "BF16")
    (tmp_path / "t5" / "spiece.model").write_bytes(b"")
    spec = get_spec("opensora-1.2")
    report = verify(tmp_path, spec.dit, spec.opensora_vae)
    assert report["ok"], report
    stdit, vae, t5 = report["parts"]
    assert (stdit["tensors"], stdit["elements"]) == (972, manifest["total_elements"])
    assert abs(vae["bytes"] - 1.57e9) < 0.01e9
    assert t5["notes"] == ["1 tensors the encoder does not use (decoder, lm_head)"]


# -- sizes and the timestep transform --------------------------------------------------------


@pytest.mark.parametrize("resolution", sorted(RESOLUTIONS))
@pytest.mark.parametrize("duration", sorted(DURATIONS))
def test_supported_sizes_and_their_timestep_transform(resolution, duration):
    height, width = RESOLUTIONS[resolution]
    frames = DURATIONS[duration]
    spec = get_spec("opensora-1.2")
    latent_frames = spec.opensora_vae.latent_frames(frames)
    assert latent_frames == frames // 17 * 5  # the reference's F_lat
    r = transform_ratio(height, width, latent_frames, spec.dit.input_sq_size)
    assert r == pytest.approx(math.sqrt(height * width / 512**2) * math.sqrt(latent_frames))
    ts = schedule(30, r)
    assert ts[0] == pytest.approx(1000.0) and all(a > b for a, b in zip(ts, ts[1:], strict=False))
    # t' = r·s/(1+(r-1)·s) at s = 0.5: always pushed toward noise for r > 1
    s = 0.5
    assert ts[15] == pytest.approx(r * s / (1 + (r - 1) * s) * 1000)
    assert ts[15] > 500
    if (resolution, duration) == ("240p", "2s"):
        assert r == pytest.approx(2.42, abs=0.005)
