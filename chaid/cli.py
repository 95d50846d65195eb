"""The ``chaid`` command line: one sub-command per job, each registered by a small function.

A sub-command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed namespace and returning an exit status. Heavy
imports (torch, the models) happen inside those callables so ``chaid --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from chaid import __version__
from chaid.config import MODEL_CFG_SCALE, load_settings
from chaid.errors import ChaidError
from chaid.numerics import NUMERICS_CHOICES
from chaid.server.cli import register_serve
from chaid.store.cli import register_cache

log = logging.getLogger("chaid")

# Exit status for a usage or input error (argparse uses the same).
EXIT_USAGE = 2
# Exit status for a failure while doing the work (bad weights, encoder failure).
EXIT_FAILURE = 1


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML settings file")
    p.add_argument("--model", help="model preset (default: tiny-shapes)")
    p.add_argument("--weights", type=Path, help="local weights directory or .safetensors file")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="model dtype")
    p.add_argument("--numerics", choices=NUMERICS_CHOICES,
                   help="round as upstream OpenSora's inference or exactly (default: auto, the "
                        "preset's; docs/opensora.md)")


def _settings_from(args: argparse.Namespace):
    return load_settings(
        args.config,
        overrides={
            "model": {
                "name": args.model,
                "weights": args.weights,
                "device": args.device,
                "dtype": args.dtype,
                "numerics": args.numerics,
            },
            "sampler": {"steps": args.steps, "cfg_scale": args.cfg_scale},
        },
    )


def _register_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate one video in this process and write it as MP4",
        description="Generate one video from a prompt, in process (no daemon), and write an MP4.",
    )
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("-o", "--output", type=Path, required=True, help="MP4 file to write")
    p.add_argument("--frames", type=int, help="video frames (default: the model's)")
    p.add_argument("--height", type=int, help="height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="width in pixels (default: the model's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: 30)")
    p.add_argument(
        "--cfg-scale", type=float, help="classifier-free guidance scale (default: the model's)"
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the run's facts")
    _add_model_flags(p)
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    settings = _settings_from(args)
    # Imported here: torch and the models take seconds to import.
    from chaid.engine.pipeline import GenerationRequest, Pipeline, apply_torch_threads
    from chaid.video import write_mp4

    apply_torch_threads(settings)
    t0 = time.perf_counter()
    pipeline = Pipeline.from_settings(settings)
    load_ms = (time.perf_counter() - t0) * 1000.0
    request = pipeline.resolve(GenerationRequest(
        prompt=args.prompt,
        frames=args.frames,
        height=args.height,
        width=args.width,
        steps=settings.sampler.steps,
        cfg_scale=(
            MODEL_CFG_SCALE if settings.sampler.cfg_scale is None else settings.sampler.cfg_scale
        ),
        seed=args.seed,
    ))
    bar = ProgressBar(sys.stderr, request.steps) if sys.stderr.isatty() else None
    result = pipeline.generate(request, on_step=bar.update if bar else None)
    if bar:
        bar.close()
    write_mp4(args.output, result.video, fps=result.fps)
    facts = {
        "output": str(args.output),
        "prompt": args.prompt,
        "model": settings.model.name,
        "device": str(pipeline.device),
        "steps": result.steps,
        "frames": result.video.shape[0],
        "height": result.video.shape[1],
        "width": result.video.shape[2],
        "fps": result.fps,
        "seed": args.seed,
        "cfg_scale": request.cfg_scale,
        "eta": pipeline.eta,
        "latent_shape": list(result.latent.shape),
        "timings": {**result.timings.as_dict(), "load_ms": round(load_ms, 1)},
    }
    understood = pipeline.understand(request.prompt)
    facts["understood"] = None if understood is None else understood.as_dict()
    if args.json:
        print(json.dumps(facts))
    else:
        if understood is not None and not understood.drawable:
            print(f"warning: {settings.model.name} cannot draw anything this prompt names "
                  "(it knows shapes, colours, motions and backgrounds of its world)",
                  file=sys.stderr)
        if understood is not None and understood.unknown:
            print(f"the model does not know: {', '.join(understood.unknown)}", file=sys.stderr)
        t = result.timings
        print(
            f"wrote {args.output}: {facts['frames']} frames {facts['width']}x{facts['height']}"
            f" in {t.total_ms / 1000:.2f} s ({result.steps} steps)"
        )
    return 0


def _register_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="inspect model weights", description="Model weights.")
    models_sub = p.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    ls = models_sub.add_parser(
        "list",
        help="the model presets and their defaults",
        description="The model presets: default video size and rate, guidance scale, and"
        " whether chaid ships trained weights for them.",
    )
    ls.add_argument("--json", action="store_true", help="print one JSON object per line")
    ls.set_defaults(func=_cmd_models_list)
    v = models_sub.add_parser(
        "verify",
        help="check an OpenSora weights directory without loading it",
        description="Check a weights directory (stdit/, vae/, t5/; see docs/opensora.md): "
        "the layout, every tensor name and shape of each checkpoint from its header, file "
        "sizes, and the configs. Exit status 0 when everything matches, 1 otherwise.",
    )
    v.add_argument("directory", type=Path, help="the weights directory")
    v.add_argument("--model", default="opensora-1.2", help="preset (default: opensora-1.2)")
    v.add_argument("--json", action="store_true", help="print the report as one JSON object")
    v.set_defaults(func=_cmd_models_verify)


def _cmd_models_list(args: argparse.Namespace) -> int:
    from chaid.models import PRESETS

    for spec in PRESETS.values():
        if spec.dit_weights is not None:
            weights = "shipped"
        elif spec.opensora_vae is not None:
            weights = "--weights DIR"
        else:
            weights = "none (seeded)"
        row = {
            "name": spec.name,
            "frames": spec.frames,
            "height": spec.height,
            "width": spec.width,
            "fps": spec.fps,
            "cfg_scale": spec.cfg_scale,
            "eta": spec.eta,
            "eta_until": spec.eta_until,
            "weights": weights,
            "description": spec.description,
        }
        if args.json:
            print(json.dumps(row))
        else:
            size = f"{spec.frames:3d} frames {spec.width}x{spec.height} @{spec.fps:2d} fps"
            print(f"{spec.name:14} {size}  cfg {spec.cfg_scale:<4g} eta {spec.eta:<4g}"
                  f" weights: {weights:14}"
                  f" {spec.description}")
    return 0


def _cmd_models_verify(args: argparse.Namespace) -> int:
    # Imported here: torch and the models take seconds to import.
    from chaid.models import get_spec
    from chaid.models.opensora import format_report, verify

    spec = get_spec(args.model)
    if spec.opensora_vae is None:
        raise ChaidError(f"{args.model} does not load from a weights directory")
    report = verify(args.directory, spec.dit, spec.opensora_vae)
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["ok"] else EXIT_FAILURE


class ProgressBar:
    """A one-line progress bar for denoising steps, drawn on a terminal stream."""

    WIDTH = 30

    def __init__(self, stream, num_steps: int) -> None:
        self.stream = stream
        self.num_steps = num_steps
        self.start = time.perf_counter()

    def update(self, step: int, t: float, z=None) -> None:
        """A sampler step hook: called before step ``step`` (1-based) runs."""
        done, num_steps = step - 1, self.num_steps
        filled = int(self.WIDTH * done / num_steps)
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self.stream.write(f"\rdenoising [{bar}] {done}/{num_steps} t={t:7.2f} {elapsed:6.1f}s")
        self.stream.flush()

    def close(self) -> None:
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\rdenoising [{'#' * self.WIDTH}] done in {elapsed:.1f}s{' ' * 12}\n")
        self.stream.flush()


# Each entry adds one sub-command; modules that grow commands add their register here.
REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_generate,
    register_serve,
    register_cache,
    _register_models,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chaid", description="chaid: a caching sidecar daemon for text-to-video diffusion"
    )
    add_common_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """--version and -v, which every chaid command line takes (the lab's too)."""
    parser.add_argument("--version", action="version",
                        version=f"{parser.prog} {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen sub-command's ``func``; return the exit status.

    A ChaidError becomes one ``PROG: error: ...`` line and its exit status (EXIT_USAGE
    unless the error names another: 65 for a damaged store), Ctrl-C exits 130:
    no traceback for anything a user can cause.
    """
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except ChaidError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
