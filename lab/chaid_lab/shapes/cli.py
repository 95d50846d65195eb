"""``chaid-lab shapes``: train the Shapes networks and judge videos against prompts.

``chaid-lab shapes train vae|judge|dit`` trains one network from scratch (seeded) and writes
its weights, by default over the shipped ones: the VAE and DiT in the model registry's
``chaid/models/data/tiny-shapes/``, the judge in ``lab/chaid_lab/shapes/weights/``.
``chaid-lab shapes judge VIDEO PROMPT`` scores a video file. Torch and the models are
imported inside the commands so ``chaid-lab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
from pathlib import Path

from chaid.checks import check_int
from chaid.errors import ChaidError
from chaid_lab.cli_args import add_sampler_args, int_list, sampler_args

# Training target → module that trains it. Each exposes
# ``cli_train(out: Path | None, seed: int, steps: int | None) -> dict`` (a JSON-able report;
# out None = the shipped weights' place).
TRAINERS: dict[str, str] = {
    "vae": "chaid_lab.shapes.train_vae",
    "judge": "chaid_lab.shapes.train_judge",
    "dit": "chaid_lab.shapes.train_dit",
}


def register(sub: argparse._SubParsersAction) -> None:
    shapes = sub.add_parser(
        "shapes",
        help="the Shapes world: train its networks, judge videos",
        description="Train the embedded default's networks on the Shapes world; judge videos.",
    )
    commands = shapes.add_subparsers(dest="shapes_command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a network from scratch and write its weights",
        description="Train one Shapes network, seeded; progress goes to stderr, the report"
        " (timings, held-out metrics) to stdout as JSON.",
    )
    train.add_argument("target", choices=sorted(TRAINERS), help="which network")
    train.add_argument(
        "--out", type=Path, help="directory for the weights (default: the shipped weights)"
    )
    train.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    train.add_argument("--steps", type=int, help="optimiser steps (default: the target's)")
    train.add_argument(
        "--init",
        type=Path,
        help="dit only: start from these DiT weights (a second stage) instead of scratch",
    )
    train.add_argument(
        "--object-weight",
        type=float,
        help="dit only: extra loss weight on latent cells showing an object (default: 0)",
    )
    train.add_argument(
        "--threads", type=int, help="dit only: torch CPU threads (default: 1)"
    )
    train.add_argument("--lr", type=float, help="dit only: peak learning rate (default: 3e-4)")
    train.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        help="dit only: after warm-up, keep the rate or decay it to 1e-5 (default: constant)",
    )
    train.add_argument("--batch-size", type=int, help="dit only: clips per step (default: 16)")
    train.add_argument(
        "--two-object-prob",
        type=float,
        help="dit only: share of training scenes with two objects (default: 0.3)",
    )
    train.add_argument(
        "--bouncing-weight",
        type=float,
        help="dit only: weight of bouncing motion against each other motion's 1 (default: 1)",
    )
    train.add_argument(
        "--dataset-size",
        type=int,
        help="dit only: scenes rendered and encoded for training (default: 8000)",
    )
    train.add_argument(
        "--contrast-reference",
        type=float,
        help="dit only: multiply the object weight of a scene whose objects stand out from"
        " their ground by less than this latent contrast by the shortfall, at most 4x"
        " (default: 0, off; docs/shapes.md)",
    )
    train.set_defaults(func=_cmd_train)

    judge = commands.add_parser(
        "judge",
        help="score a video against a prompt",
        description="Score how well a video shows what a prompt names: per-attribute"
        " probabilities and an overall score in [0, 1].",
    )
    judge.add_argument("video", type=Path, help="video file (MP4)")
    judge.add_argument("prompt", nargs="?", help="the prompt")
    judge.add_argument("--prompt", dest="prompt_flag", metavar="PROMPT", help="the prompt")
    judge.add_argument("--weights", type=Path, help="judge weights (default: the shipped ones)")
    judge.add_argument("--json", action="store_true", help="print one JSON object")
    judge.set_defaults(func=_cmd_judge)

    ev = commands.add_parser(
        "eval",
        help="judge scores of the evaluation suite per step count",
        description="Generate the fixed Shapes evaluation suite (held-out attribute"
        " combinations included) at each step count and score every video with the judge;"
        " prints a table, optionally writes JSON, a plot and a contact sheet.",
    )
    ev.add_argument(
        "--steps",
        default="1,2,4,8,16,30",
        help="comma-separated step counts (default: 1,2,4,8,16,30)",
    )
    ev.add_argument("--limit", type=int, help="only the first N items of the suite")
    ev.add_argument(
        "--stride", type=int, default=1, help="every Nth item of the suite (before --limit)"
    )
    ev.add_argument(
        "--cfg-scale", type=float, help="classifier-free guidance scale (default: the model's)"
    )
    add_sampler_args(ev)
    ev.add_argument("--model", default="tiny-shapes", help="model preset (default: tiny-shapes)")
    ev.add_argument("--weights", type=Path, help="DiT weights (default: the preset's)")
    ev.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    ev.add_argument("--json", type=Path, help="write the report here")
    ev.add_argument("--against", type=Path,
                    help="an earlier --json report of the same items: print the paired"
                         " differences (this minus it) with 95%% intervals")
    ev.add_argument("--plot", type=Path, help="write the judge-vs-steps plot here (PNG)")
    ev.add_argument(
        "--sheet", type=Path, help="write a contact sheet of sample frames here (PNG)"
    )
    ev.add_argument(
        "--sheet-items",
        default="0,1,2,5",
        help="suite items shown on the contact sheet (default: 0,1,2,5)",
    )
    ev.set_defaults(func=_cmd_eval)

    defects = commands.add_parser(
        "defects",
        help="count the model's visible defects (bounce jumps, extra objects, shape changes)",
        description="Generate fixed prompts at several seeds and flag three visible defects"
        " by metric: a jump at a bounce, a second object for a one-object prompt, a shape"
        " that changes during the clip; the true renders of the same prompts are checked"
        " alongside (they must show none). Prints a table; --json writes every reading.",
    )
    defects.add_argument("--seeds", type=int, default=10, help="seeds per prompt (default: 10)")
    defects.add_argument("--steps", type=int, help="denoising steps (default: the full run's)")
    defects.add_argument(
        "--cfg-scale", type=float, help="classifier-free guidance scale (default: the model's)"
    )
    add_sampler_args(defects)
    defects.add_argument("--checks", default="jump,extra_object,shape_change",
                         help="which checks (default: all three)")
    defects.add_argument("--model", default="tiny-shapes",
                         help="model preset (default: tiny-shapes)")
    defects.add_argument("--weights", type=Path, help="DiT weights (default: the preset's)")
    defects.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    defects.add_argument("--json", type=Path, help="write the report here")
    defects.set_defaults(func=_cmd_defects)

    chai = commands.add_parser(
        "eval-chai",
        help="CHAI on entity-sharing prompt pairs: full-30 vs plain-8 vs CHAI-8",
        description="For prompt pairs sharing a scene or an object, fill the cache with the"
        " first prompt's full run, then generate the second as full-30, plain-8 and CHAI-8;"
        " print judge score and latency per method (measured in one run).",
    )
    chai.add_argument("--pairs", type=int, default=12, help="prompt pairs (default: 12)")
    chai.add_argument("--seed", type=int, default=0, help="seed of pairs and noise (default: 0)")
    chai.add_argument("--model", default="tiny-shapes", help="model preset (default: tiny-shapes)")
    chai.add_argument("--json", type=Path, help="also write the full report here")
    chai.set_defaults(func=_cmd_eval_chai)


def _cmd_train(args: argparse.Namespace) -> int:
    try:
        trainer = importlib.import_module(TRAINERS[args.target])
    except ModuleNotFoundError as exc:
        if exc.name != TRAINERS[args.target]:
            raise
        raise ChaidError(f"training {args.target} is not available in this version") from None
    # Training reports progress through logging; show it even without -v.
    logging.getLogger("chaid_lab.shapes").setLevel(logging.INFO)
    extra = {
        k: v
        for k, v in (
            ("init", args.init),
            ("object_weight", args.object_weight),
            ("threads", args.threads),
            ("lr", args.lr),
            ("lr_schedule", args.lr_schedule),
            ("batch_size", args.batch_size),
            ("two_object_prob", args.two_object_prob),
            ("bouncing_weight", args.bouncing_weight),
            ("dataset_size", args.dataset_size),
            ("contrast_reference", args.contrast_reference),
        )
        if v is not None
    }
    if extra and args.target != "dit":
        raise ChaidError(f"--{next(iter(extra)).replace('_', '-')} applies to dit only")
    report = trainer.cli_train(args.out, args.seed, args.steps, **extra)
    print(json.dumps(report))
    return 0


def _cmd_judge(args: argparse.Namespace) -> int:
    prompt = args.prompt_flag if args.prompt_flag is not None else args.prompt
    if prompt is None:
        raise ChaidError("give the prompt, as an argument or with --prompt")
    from chaid.video import read_video
    from chaid_lab.shapes.judge import load_judge, score

    video, _ = read_video(args.video)
    result = score(video, prompt, load_judge(args.weights))
    if args.json:
        print(json.dumps({"video": str(args.video), "prompt": prompt, **result}))
        return 0
    print(f"overall {result['overall']:.3f}")
    for name, p in result["attributes"].items():
        print(f"  {name:<12} {p:.3f}")
    seen = result["predicted"]
    print(
        f"judge sees: {seen['num_objects']} object(s); {seen['colour']} {seen['shape']}"
        f" {seen['motion']} over {seen['background']}"
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from chaid.config import MAX_STEPS, MODEL_CFG_SCALE

    steps = sorted(set(int_list("--steps", args.steps, 1, MAX_STEPS)))
    sheet_items = int_list("--sheet-items", args.sheet_items, 0, 10**6)
    if args.limit is not None and args.limit < 1:
        raise ChaidError("--limit must be at least 1")
    if args.stride < 1:
        raise ChaidError("--stride must be at least 1")
    check_int("--threads", args.threads, 1, 256, ChaidError)
    sampler = sampler_args(args)
    base = None
    if args.against is not None:  # read before the long run, not after it
        try:
            base = json.loads(args.against.read_text())
            base["rows"], base["steps"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ChaidError(f"--against {args.against}: not an eval report ({e})") from None
    import torch

    from chaid.engine.pipeline import Pipeline
    from chaid.models import build_parts
    from chaid_lab.shapes import suite

    if args.plot or args.sheet:
        suite._require_matplotlib()  # fail before the long run, not after it
    torch.set_num_threads(args.threads)
    logging.getLogger("chaid_lab.shapes").setLevel(logging.INFO)
    items = suite.evaluation_suite()[:: args.stride][: args.limit]
    chosen = {item.index for item in items}
    keep = [i for i in sheet_items if i in chosen] if args.sheet else []
    pipeline = Pipeline(build_parts(args.model, args.weights), torch.device("cpu"),
                        **sampler)
    scale = MODEL_CFG_SCALE if args.cfg_scale is None else args.cfg_scale
    report = suite.evaluate_steps(pipeline, items, steps, keep_videos=keep, cfg_scale=scale)
    report["model"] = args.model
    report["sampler"] = pipeline.sampler
    if base is not None:
        try:
            report["against"] = {"base": str(args.against), **suite.paired_against(report, base)}
        except ValueError as e:
            raise ChaidError(f"--against {args.against}: {e}") from None
    if args.weights is not None:
        report["weights"] = str(args.weights)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        suite.plot_curve(report, args.plot)
    if args.sheet and report["videos"]:
        args.sheet.parent.mkdir(parents=True, exist_ok=True)
        suite.contact_sheet(report, args.sheet)
    del report["videos"]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    print(suite.format_table(report))
    if "against" in report:
        print(suite.format_against(report["against"]))
    return 0


def _cmd_defects(args: argparse.Namespace) -> int:
    from chaid.config import MAX_STEPS
    from chaid_lab.shapes import defects

    check_int("--seeds", args.seeds, 1, 1000, ChaidError)
    check_int("--threads", args.threads, 1, 256, ChaidError)
    sampler = sampler_args(args)
    if args.steps is not None:
        check_int("--steps", args.steps, 1, MAX_STEPS, ChaidError)
    checks = tuple(c for c in args.checks.split(",") if c)
    unknown = set(checks) - set(defects.PROMPTS)
    if unknown or not checks:
        raise ChaidError(f"--checks: unknown {sorted(unknown)} (known: {', '.join(defects.PROMPTS)})")
    import torch

    from chaid.engine.pipeline import Pipeline
    from chaid.models import build_parts

    torch.set_num_threads(args.threads)
    logging.getLogger("chaid_lab.shapes").setLevel(logging.INFO)
    pipeline = Pipeline(build_parts(args.model, args.weights), torch.device("cpu"),
                        **sampler)
    report = defects.run(pipeline, args.seeds, args.steps, args.cfg_scale, checks)
    report["model"] = args.model
    if args.weights is not None:
        report["weights"] = str(args.weights)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    print(defects.format_table(report))
    return 0


def _cmd_eval_chai(args: argparse.Namespace) -> int:
    check_int("--pairs", args.pairs, 1, 1000, ChaidError)
    import torch

    from chaid.engine.pipeline import Pipeline
    from chaid.models import build_parts
    from chaid_lab.shapes.chai_eval import entity_sharing_pairs, evaluate, format_table

    logging.getLogger("chaid_lab.shapes").setLevel(logging.INFO)
    pipeline = Pipeline(build_parts(args.model), torch.device("cpu"))
    report = evaluate(pipeline, entity_sharing_pairs(args.pairs, args.seed), args.seed)
    report["model"] = args.model
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    print(format_table(report))
    return 0
