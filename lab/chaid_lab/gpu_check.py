"""End-to-end check of the OpenSora 1.2 path with random weights: full vs fast mode.

``python -m chaid_lab.gpu_check`` builds the ``opensora-1.2`` DiT at its full width
and a reduced depth, the full-size VAE v1.2, and a hashed stand-in for T5-XXL (random T5
weights would only cost memory and load time), all with random weights in bf16, then runs
the CHAI pipeline once in full mode (30 steps, capturing the latents a hit reuses) and once
in fast mode (8 steps with Cache Attention on those latents). It prints, per mode, the
latency per denoising step, the decode time and the peak GPU memory. ``make gpu-check``
runs it. Exits 2 when asked for CUDA and none is usable.

Random weights make the video noise; the numbers measure the execution path, not quality.
A depth-28 run gives the real per-step cost (``--depth 28``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from typing import Any

import torch

from chaid.models import ModelParts, build_model, get_spec
from chaid.models.opensora import DURATIONS, RESOLUTIONS
from chaid.models.opensora_vae import build_opensora_vae
from chaid.models.text import HashTextEncoder

# Depth of the reduced DiT: enough blocks that per-step time is dominated by blocks, small
# enough to build and run in seconds on one GPU.
DEFAULT_DEPTH = 4
PROMPT = "a red fox running through fresh snow at dawn"


def random_parts(
    preset: str, depth: int | None, device: torch.device, dtype: torch.dtype
) -> ModelParts:
    """The preset's DiT (reduced to ``depth`` pairs) and full VAE with seeded random weights,
    and a hashed text encoder of T5's width; nothing is read from disk."""
    spec = get_spec(preset)
    overrides = {} if depth is None else {"depth": depth}
    dit = build_model(preset, device=device, dtype=dtype, **overrides)
    vae = build_opensora_vae(spec.opensora_vae, device=device, dtype=dtype)
    text = HashTextEncoder(spec.dit.caption_channels, spec.dit.model_max_length)
    return ModelParts(spec=spec, dit=dit, text_encoder=text, vae=vae)


def run_check(
    *,
    preset: str = "opensora-1.2",
    depth: int | None = DEFAULT_DEPTH,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    frames: int = DURATIONS["2s"],
    height: int = RESOLUTIONS["240p"][0],
    width: int = RESOLUTIONS["240p"][1],
    full_steps: int = 30,
    fast_steps: int = 8,
    kernel: str = "auto",
) -> list[dict[str, Any]]:
    """Full then fast generation; one row of timings per mode."""
    # Imported here: the check drives the engine, which the models package never imports.
    from chaid.config import ChaiSettings
    from chaid.engine.pipeline import GenerationRequest, Pipeline

    dev = torch.device(device)
    chai = dataclasses.replace(
        ChaiSettings(), full_steps=full_steps, fast_steps=fast_steps, kernel=kernel
    )
    pipeline = Pipeline(random_parts(preset, depth, dev, dtype), dev, chai)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    size = {"frames": frames, "height": height, "width": width}
    # 1. warm-up: kernels compile and allocator pools fill outside the measured runs
    pipeline.generate(GenerationRequest(PROMPT, steps=2, **size))
    rows = []
    cached: dict[int, torch.Tensor] = {}
    for mode in ("full", "fast"):
        stamps: list[float] = []

        def on_step(step: int, t: float, z: torch.Tensor, stamps=stamps) -> None:
            sync()
            stamps.append(time.perf_counter())

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        # 2. the measured run (full captures z_2..z_4; fast attends to them)
        if mode == "full":
            req = GenerationRequest(
                PROMPT, steps=full_steps, capture_steps=chai.cache_steps, **size
            )
        else:
            req = GenerationRequest(PROMPT, steps=fast_steps, cache_latents=cached, **size)
        result = pipeline.generate(req, on_step=on_step)
        if mode == "full":
            cached = result.captured
        step_ms = [(b - a) * 1000 for a, b in zip(stamps, stamps[1:], strict=False)]
        rows.append(
            {
                "mode": result.run.value,
                "steps": result.steps,
                "latent": list(result.latent.shape),
                "video": list(result.video.shape),
                "ms_per_step": round(statistics.median(step_ms), 2) if step_ms else None,
                "denoise_ms": round(result.timings.denoise_ms, 1),
                "decode_ms": round(result.timings.decode_ms, 1),
                "total_ms": round(result.timings.total_ms, 1),
                "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
                if dev.type == "cuda"
                else None,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaid_lab.gpu_check", description=__doc__)
    p.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help="DiT block pairs (28: full)")
    p.add_argument("--resolution", choices=sorted(RESOLUTIONS), default="240p")
    p.add_argument("--duration", choices=sorted(DURATIONS), default="2s")
    p.add_argument("--device", default="cuda")
    p.add_argument("--kernel", choices=["auto", "reference", "cupy"], default="auto")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: the OpenSora GPU path is untested here", file=sys.stderr)
        return 2
    height, width = RESOLUTIONS[args.resolution]
    frames = DURATIONS[args.duration]
    print(
        f"opensora-1.2 depth {args.depth}, {frames} x {height} x {width}, bf16,"
        f" random weights, kernel {args.kernel}"
    )
    rows = run_check(
        depth=args.depth,
        device=args.device,
        frames=frames,
        height=height,
        width=width,
        kernel=args.kernel,
    )
    print(
        f"{'mode':<6}{'steps':>6}{'ms/step':>10}{'denoise ms':>12}{'decode ms':>11}"
        f"{'total ms':>10}{'peak GiB':>10}"
    )
    for r in rows:
        print(
            f"{r['mode']:<6}{r['steps']:>6}{r['ms_per_step']:>10}{r['denoise_ms']:>12}"
            f"{r['decode_ms']:>11}{r['total_ms']:>10}{r['peak_gib'] or '-':>10}"
        )
    full, fast = rows
    print(f"fast / full denoise: {fast['denoise_ms'] / full['denoise_ms']:.3f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
