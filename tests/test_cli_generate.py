"""`chaid generate` as a user runs it: a real process writing a real MP4."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chaid.video import read_video


def chaid_command() -> list[str]:
    script = Path(sys.executable).parent / "chaid"
    return [str(script)] if script.exists() else [sys.executable, "-m", "chaid"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*chaid_command(), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.integration
def test_generate_writes_the_requested_video_and_reports_json(tmp_path):
    out = tmp_path / "v.mp4"
    proc = run(
        "generate",
        "a blue square bouncing over the ocean",
        "-o",
        str(out),
        "--frames",
        "6",
        "--height",
        "48",
        "--width",
        "40",
        "--steps",
        "5",
        "--seed",
        "3",
        "--json",
        "--model",
        "tiny-test",
    )
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert (facts["steps"], facts["frames"], facts["height"], facts["width"], facts["seed"]) == (
        5,
        6,
        48,
        40,
        3,
    )
    assert set(facts["timings"]) >= {"encode_ms", "denoise_ms", "decode_ms", "total_ms"}
    assert facts["timings"]["total_ms"] >= facts["timings"]["denoise_ms"] > 0
    video, fps = read_video(out)
    assert video.shape == (6, 48, 40, 3) and fps == facts["fps"]
    # not a terminal: no progress bar on stderr
    assert "denoising" not in proc.stderr


@pytest.mark.integration
def test_generate_default_model_and_settings_from_environment(tmp_path):
    out = tmp_path / "d.mp4"
    proc = run(
        "generate", "a red circle", "-o", str(out), "--json", env={"CHAID_SAMPLER_STEPS": "3"}
    )
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["model"] == "tiny-shapes" and facts["steps"] == 3
    from chaid.models import get_spec

    assert facts["cfg_scale"] == get_spec("tiny-shapes").cfg_scale  # the model's own scale
    listed = [json.loads(line) for line in run("models", "list", "--json").stdout.splitlines()]
    shapes = next(m for m in listed if m["name"] == "tiny-shapes")
    assert shapes["cfg_scale"] == facts["cfg_scale"] and shapes["weights"] == "shipped"
    assert shapes["eta"] == facts["eta"] == get_spec("tiny-shapes").eta  # the model's own
    assert read_video(out)[0].shape == (facts["frames"], facts["height"], facts["width"], 3)


@pytest.mark.integration
@pytest.mark.parametrize(
    "args, message",
    [
        (["--height", "30"], "multiples of 8"),
        (["--steps", "0"], "sampler.steps"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--weights", "/nonexistent/w"], "no weights file"),
        (["--device", "cuda:0"], None),
    ],
)
def test_bad_arguments_fail_with_one_clear_line(tmp_path, args, message):
    import torch

    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = tmp_path / "x.mp4"
    proc = run("generate", "a red circle", "-o", str(out), "--steps", "2", *args)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line.startswith("chaid: error:") and "Traceback" not in proc.stderr
    assert message is None or message in line
    assert not out.exists()
