"""Strict checkpoint loading: round trip, and a clear error naming each bad tensor."""

import pytest
import torch
from safetensors.torch import save_file

from chaid.errors import ChaidError, WeightsError
from chaid.models import build_model
from chaid.models.weights import WEIGHTS_FILE, save_weights


def _state(model):
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def _forward(model):
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 2, 4, 4, generator=gen)
    y = torch.randn(1, cfg.model_max_length, cfg.caption_channels, generator=gen)
    with torch.no_grad():
        return model(z, torch.tensor([500.0]), y, height=32, width=32)


def test_round_trip_through_a_directory(tmp_path):
    src = build_model("tiny-test", seed=1)
    path = save_weights(src, tmp_path / "ckpt")
    assert path.name == WEIGHTS_FILE
    loaded = build_model("tiny-test", weights=tmp_path / "ckpt")
    assert torch.equal(_forward(src), _forward(loaded))
    # loaded straight to its device: nothing is left on meta
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_round_trip_to_bfloat16(tmp_path):
    src = build_model("tiny-test", seed=1)
    save_weights(src, tmp_path / "m.safetensors")
    loaded = build_model("tiny-test", weights=tmp_path / "m.safetensors", dtype=torch.bfloat16)
    assert loaded.x_embedder.proj.weight.dtype == torch.bfloat16


def test_missing_tensor_is_named(tmp_path):
    state = _state(build_model("tiny-test"))
    del state["spatial_blocks.1.attn.qkv.bias"]
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(WeightsError, match=r"1 missing: spatial_blocks\.1\.attn\.qkv\.bias"):
        build_model("tiny-test", weights=tmp_path / "m.safetensors")


def test_unexpected_tensor_is_named(tmp_path):
    state = _state(build_model("tiny-test"))
    state["pos_embed"] = torch.zeros(3)
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(WeightsError, match=r"1 unexpected: pos_embed"):
        build_model("tiny-test", weights=tmp_path / "m.safetensors")


def test_wrong_shape_is_named_with_both_shapes(tmp_path):
    state = _state(build_model("tiny-test"))
    state["final_layer.linear.weight"] = torch.zeros(16, 64)
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(
        WeightsError, match=r"final_layer\.linear\.weight \(expected \[32, 64\], found \[16, 64\]\)"
    ):
        build_model("tiny-test", weights=tmp_path / "m.safetensors")


def test_checkpoint_of_another_config_lists_all_problems(tmp_path):
    save_weights(build_model("tiny-test", depth=3), tmp_path / "m.safetensors")
    with pytest.raises(WeightsError) as info:
        build_model("tiny-test", weights=tmp_path / "m.safetensors")
    assert "unexpected" in str(info.value) and "spatial_blocks.2" in str(info.value)


def test_optional_rope_freqs_accepted_when_right_rejected_when_wrong(tmp_path):
    model = build_model("tiny-test")
    state = _state(model)
    state["rope.freqs"] = model.rope.freqs()
    save_file(state, str(tmp_path / "ok.safetensors"))
    build_model("tiny-test", weights=tmp_path / "ok.safetensors")
    state["rope.freqs"] = model.rope.freqs() * 2
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match="rope.freqs"):
        build_model("tiny-test", weights=tmp_path / "bad.safetensors")


def test_missing_truncated_and_garbage_files(tmp_path):
    with pytest.raises(WeightsError, match="no weights file"):
        build_model("tiny-test", weights=tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no weights file"):
        build_model("tiny-test", weights=tmp_path / "empty")
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match="not a safetensors file"):
        build_model("tiny-test", weights=tmp_path / "garbage.safetensors")
    path = save_weights(build_model("tiny-test"), tmp_path / "whole.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError):
        build_model("tiny-test", weights=tmp_path / "cut.safetensors")


def test_unknown_preset_and_config_field():
    with pytest.raises(ChaidError, match="unknown model 'nope'"):
        build_model("nope")
    with pytest.raises(ChaidError, match="unknown STDiT3 config fields: depht"):
        build_model("tiny-test", depht=3)


def test_file_digest_tells_trainings_apart(tmp_path):
    from chaid.models.weights import file_digest

    a = save_weights(build_model("tiny-test", seed=1), tmp_path / "a")
    b = save_weights(build_model("tiny-test", seed=2), tmp_path / "b")
    again = save_weights(build_model("tiny-test", seed=1), tmp_path / "again")
    assert file_digest(a) == file_digest(tmp_path / "a") == file_digest(again)  # dir or file
    assert file_digest(a) != file_digest(b) and len(file_digest(a)) == 24
    with pytest.raises(WeightsError, match="no weights file"):
        file_digest(tmp_path / "none")
