"""The OpenSora GPU path: the end-to-end check script (on the CPU at a tiny size here) and,
where CUDA is present, bf16 runs at OpenSora's real widths (tests marked gpu)."""

import pytest
import torch

from chaid.models.opensora_vae import build_opensora_vae
from chaid_lab.gpu_check import run_check

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: the OpenSora GPU path is untested"
)


def test_check_script_runs_full_then_fast_on_the_cpu():
    torch.set_num_threads(1)
    rows = run_check(
        preset="opensora-tiny",
        depth=None,
        device="cpu",
        dtype=torch.float32,
        frames=17,
        height=64,
        width=96,
        full_steps=4,
        fast_steps=4,
        kernel="reference",
    )
    assert [r["mode"] for r in rows] == ["full", "fast"]
    for r in rows:
        assert r["latent"] == [4, 5, 8, 12] and r["video"] == [17, 64, 96, 3]
        assert r["ms_per_step"] > 0 and r["peak_gib"] is None


@pytest.mark.gpu
@needs_cuda
def test_reduced_depth_opensora_full_and_fast_in_bf16():
    rows = run_check(depth=1, full_steps=4, fast_steps=4)
    assert [r["mode"] for r in rows] == ["full", "fast"]
    assert rows[0]["latent"] == [4, 15, 30, 53]
    assert rows[0]["video"] == [51, 240, 424, 3]  # the 2D VAE decodes 8 x 53 columns


@pytest.mark.gpu
@needs_cuda
def test_full_size_vae_round_trip_in_bf16():
    vae = build_opensora_vae(device="cuda", dtype=torch.bfloat16)
    video = torch.rand(1, 3, 51, 240, 426, device="cuda") * 2 - 1
    z = vae.encode(video)
    assert z.shape == (1, 4, 15, 30, 53) and torch.isfinite(z).all()
    out = vae.decode(z, 51)
    assert out.shape == (1, 3, 51, 240, 424) and torch.isfinite(out).all()
