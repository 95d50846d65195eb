"""The visible defects of tiny-shapes under sampling rules the product does not offer.

docs/shapes.md ("What guidance can and cannot do", "Stochastic steps") records what these
gave; the rules the product does offer (classifier-free and temporal guidance, stochastic
steps, step counts) run through ``chaid-lab shapes defects`` instead. On top of the
preset's classifier-free guidance, over the defect checks' prompts and 10 seeds:

* ``--temporal S --blocks 0,1``: temporal guidance with the identity in only some temporal
  blocks (the product's ``sampler.temporal_guidance`` uses every block);
* ``--autoguide L --weak FILE``: autoguidance, v += L·(v_cond − v_weak,cond), where the
  weak model is an earlier checkpoint of the same DiT (e.g. the stage-2 weights from the
  repository's history: ``git show 32a82f2:chaid/shapes/weights/dit.safetensors``);
* ``--spatial S --blocks B``: the same with the identity in the spatial self-attention of
  blocks B instead (each token attends to itself only within its frame);
* ``--early-cfg G --until T``: classifier-free guidance G while t > T (the steps that lay
  out the clip), the preset's below;
* ``--churn η --churn-until T``: stochastic steps (``sampler.stochastic_step``) while
  t > T, with fresh noise from one generator per video (the product draws it per step);
* ``--steps N`` (30), ``--shift r`` (the schedule's ratio), ``--checks``, ``--frames DIR``
  (each video saved as .npy).

    python lab/scripts/guidance_defects.py --temporal 1 --blocks 0,1 --json out/g.json
    python lab/scripts/guidance_defects.py --churn 1 --churn-until 600 --checks jump"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from chaid.engine.pipeline import GenerationRequest, Pipeline
from chaid.engine.sampler import Guidance, euler_step, schedule, stochastic_step
from chaid.models import build_parts
from chaid_lab.shapes import defects
from chaid_lab.shapes.judge import load_judge


def identity_in(kind_skipped: str, blocks: set[int]):
    def attend(block, h, prepare):
        _, _, v = block.attn.project_qkv(h)
        return block.attn.project_out(v)

    return lambda kind, index: attend if kind == kind_skipped and index in blocks else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--temporal", type=float, default=0.0, help="temporal guidance scale")
    ap.add_argument("--spatial", type=float, default=0.0, help="spatial skip guidance scale")
    ap.add_argument("--blocks", default="0,1,2,3", help="blocks made the identity")
    ap.add_argument("--autoguide", type=float, default=0.0, help="autoguidance scale")
    ap.add_argument("--weak", type=Path, help="the weak DiT's weights (autoguidance)")
    ap.add_argument("--early-cfg", type=float, help="guidance scale while t > --until")
    ap.add_argument("--until", type=float, default=800.0, help="see --early-cfg (800)")
    ap.add_argument("--churn", type=float, default=0.0,
                    help="share of fresh noise in each step's re-noised estimate (0: the ODE)")
    ap.add_argument("--churn-until", type=float, default=0.0,
                    help="the stochastic steps run while t > this, Euler steps below (0)")
    ap.add_argument("--checks", default=",".join(defects.PROMPTS), help="checks to run")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--shift", type=float, help="the schedule's ratio r (the preset's: 2)")
    ap.add_argument("--seeds", type=int, default=defects.DEFAULT_SEEDS)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--frames", type=Path, help="save each video here (.npy)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = Pipeline(build_parts("tiny-shapes"), torch.device("cpu"))
    weak = build_parts("tiny-shapes", args.weak).dit if args.autoguide else None
    blocks = {int(b) for b in args.blocks.split(",")}
    plan = identity_in("temporal", blocks)
    spatial_plan = identity_in("spatial", blocks)
    judge = load_judge()
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    t0 = time.perf_counter()
    for check in args.checks.split(","):
        prompts = defects.PROMPTS[check]
        flags, readings = [], []
        for prompt in prompts:
            for seed in range(args.seeds):
                run = pipe.start(GenerationRequest(prompt, seed=seed, steps=args.steps))
                if args.shift:
                    run.timesteps = schedule(args.steps, args.shift)
                size = (run.request.fps, run.guidance.height, run.guidance.width)
                cond = Guidance(pipe.parts.dit, run.text, None, *size)
                weak_cond = Guidance(weak, run.text, None, *size) if weak else None
                early = (Guidance(pipe.parts.dit, run.text, args.early_cfg, *size)
                         if args.early_cfg is not None else None)
                noise = torch.Generator().manual_seed(seed)
                with torch.inference_mode():
                    while not run.done:
                        guide = early if early is not None and run.t > args.until \
                            else run.guidance
                        v = guide.velocity(run.z, run.t)
                        if args.temporal or args.spatial or weak_cond is not None:
                            v_cond = cond.velocity(run.z, run.t)  # once per step
                        if args.temporal:
                            v = v + args.temporal * (v_cond - cond.velocity(run.z, run.t, plan))
                        if args.spatial:
                            v = v + args.spatial * (v_cond - cond.velocity(run.z, run.t,
                                                                           spatial_plan))
                        if weak_cond is not None:
                            v = v + args.autoguide * (v_cond - weak_cond.velocity(run.z, run.t))
                        if args.churn and run.t > args.churn_until:
                            fresh = torch.randn(run.z.shape, generator=noise)
                            run.z = stochastic_step(run.z, v, run.t, run.t_next, args.churn,
                                                    fresh)
                        else:
                            run.z = euler_step(run.z, v, run.t, run.t_next)
                        run.index += 1
                video = pipe.finish(run).video
                reading = defects.measure(video, prompt, judge)
                flags.append(defects.flagged(check, reading))
                readings.append(reading)
                if args.frames:
                    args.frames.mkdir(parents=True, exist_ok=True)
                    np.save(args.frames / f"{check}-{prompts.index(prompt)}-{seed}.npy", video)
        report[check] = {"rate": sum(flags) / len(flags),
                         "per_prompt": [sum(flags[i * args.seeds:(i + 1) * args.seeds])
                                        for i in range(len(prompts))],
                         "readings": [asdict(r) for r in readings]}
        print(check, report[check], f"{time.perf_counter() - t0:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
