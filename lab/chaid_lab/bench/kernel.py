"""GPU check for Cache Attention: the CuPy kernel against the torch reference.

``python -m chaid_lab.bench.kernel`` prints, for realistic shapes and each dtype, the maximum
absolute error of the kernel against the fp32 reference and the time of both (CUDA
events, median of repeats), then a fast-mode generation with each backend. Exits 1 if any
error exceeds its dtype's tolerance, 2 if no GPU is usable.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from chaid.kernels import cuda
from chaid.kernels.reference import cache_attention_reference

# (label, rows N = frames x guidance branches, heads, tokens per frame, head dim)
SHAPES = [
    ("opensora-240p", 2 * 15, 16, 405, 72),
    ("opensora-480p", 2 * 15, 16, 1620, 72),
    ("tiny-shapes", 2 * 8, 3, 16, 64),
]
# Largest acceptable max-abs error against the fp32 reference.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _time_ms(fn, repeats: int) -> float:
    fn()  # warm-up (compiles the kernel on first use)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_table(repeats: int) -> bool:
    ok = True
    print(
        f"{'shape':<16}{'dtype':<10}{'max err':>10}{'sdpa ms':>10}{'cupy ms':>10}{'cupy/sdpa':>11}"
    )
    for label, n, heads, tokens, d in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        base = [torch.randn(n, heads, tokens, d, device="cuda", generator=gen) for _ in range(3)]
        ref = cache_attention_reference(*base)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            q, k, v = (t.to(dtype) for t in base)
            err = (cuda.cache_attention_cupy(q, k, v).float() - ref).abs().max().item()
            sdpa = _time_ms(lambda q=q, k=k, v=v: cache_attention_reference(q, k, v), repeats)
            kern = _time_ms(lambda q=q, k=k, v=v: cuda.cache_attention_cupy(q, k, v), repeats)
            flag = "" if err <= TOLERANCE[dtype] else "  FAIL"
            ok &= not flag
            name = str(dtype).removeprefix("torch.")
            print(
                f"{label:<16}{name:<10}{err:>10.2e}{sdpa:>10.3f}{kern:>10.3f}{kern / sdpa:>11.2f}{flag}"
            )
    return ok


def pipeline_check() -> bool:
    """A fast-mode tiny-test generation on the GPU with each backend: latents must agree."""
    import dataclasses

    from chaid.config import ChaiSettings
    from chaid.engine.pipeline import Pipeline
    from chaid.models import build_parts

    device = torch.device("cuda")
    parts = build_parts("tiny-test", device=device)
    results = {}
    for backend in ("reference", "cupy"):
        pipe = Pipeline(parts, device, dataclasses.replace(ChaiSettings(), kernel=backend))
        full = pipe.full("a red circle moving left", seed=1)
        results[backend] = pipe.fast("a crimson ball drifting left", full.captured, seed=2)
    err = (results["cupy"].latent - results["reference"].latent).abs().max().item()
    print(f"fast-mode pipeline, cupy vs reference: max latent error {err:.2e}")
    return err <= 1e-3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    ok, why = cuda.availability()
    if not ok:
        print(f"GPU check not run: {why}", file=sys.stderr)
        return 2
    print(
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}"
    )
    passed = kernel_table(args.repeats) & pipeline_check()
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
