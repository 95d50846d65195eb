"""The OpenSora 1.2 preset has exactly the released checkpoint's tensor names and shapes."""

import json
import math

import torch

from chaid.models import build_model
from chaid.models.weights import model_shapes


def test_opensora_meta_model_matches_manifest(shared_dir):
    manifest = json.loads((shared_dir / "reference" / "stdit3_xl2_keys.json").read_text())
    expected = {k: tuple(v) for k, v in manifest["keys"].items()}
    model = build_model("opensora-1.2", device="meta")
    got = model_shapes(model)
    assert sorted(set(expected) - set(got)) == []  # nothing missing
    assert sorted(set(got) - set(expected)) == []  # nothing extra
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert wrong == {}
    assert sum(math.prod(s) for s in got.values()) == manifest["total_elements"]
    # meta: shapes only, no memory
    assert all(p.is_meta for p in model.parameters())


def test_optional_rope_freqs_have_the_manifest_shape(shared_dir):
    manifest = json.loads((shared_dir / "reference" / "stdit3_xl2_keys.json").read_text())
    model = build_model("opensora-1.2", device="meta")
    assert tuple(model.rope.freqs().shape) == tuple(manifest["optional"]["rope.freqs"])


def test_random_init_is_seeded():
    a = build_model("tiny-test", seed=3)
    b = build_model("tiny-test", seed=3)
    c = build_model("tiny-test", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_config_overrides_build_a_reduced_copy():
    model = build_model("opensora-1.2", device="meta", depth=2)
    assert len(model.spatial_blocks) == 2 and len(model.temporal_blocks) == 2
    assert model.cfg.hidden_size == 1152


def test_reduced_depth_opensora_runs_at_full_width():
    """The XL/2 widths (head_dim 72, caption 4096) run end to end on a small latent."""
    model = build_model("opensora-1.2", depth=1)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 2, 6, 9, generator=gen)  # odd width exercises the padding
    y = torch.randn(1, 300, 4096, generator=gen)
    mask = torch.zeros(1, 300, dtype=torch.bool)
    mask[0, :12] = True
    with torch.no_grad():
        out = model(z, torch.tensor([900.0]), y, mask, fps=24, height=48, width=72)
    assert out.shape == (1, 8, 2, 6, 9) and torch.isfinite(out).all()
