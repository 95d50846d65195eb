"""How far an object stands out from its background in the VAE's latent, per colour and
background, and how often a bouncing object of that pair jumps (docs/shapes.md, "Where the
jumps left come from").

Contrast: ``train_dit.object_contrast`` of one-object scenes of the world (the distance of
the object cells' mean latent from its ground's, in units of the ground's spread per
channel), averaged per pair.

Jumps (``--seeds N``): "a {colour} {shape} bouncing around {background}" at N seeds (the
shape cycles through the three with the seed) with the preset's sampler, flagged by the
defect check's blob tracker (``chaid_lab.shapes.defects``, > 20 px in one frame); the VAE
round trips of the same prompts' true renders are read alongside. Prints a table per pair
and the rank correlation of contrast and jump rate over the pairs.

    python lab/scripts/latent_contrast.py --scenes 1500                  # contrast, 25 s
    python lab/scripts/latent_contrast.py --seeds 10 --json out/lc.json  # + jumps, ~8 min
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from chaid.engine.pipeline import GenerationRequest, Pipeline
from chaid.models import build_parts
from chaid_lab.fidelity import largest_blob_jump
from chaid_lab.shapes.data import to_tensor
from chaid_lab.shapes.defects import VISIBLE_JUMP_PX, round_trip
from chaid_lab.shapes.heldout import HELD_OUT_COLOUR_BACKGROUNDS, HELD_OUT_OBJECTS
from chaid_lab.shapes.prompts import scene_for_prompt
from chaid_lab.shapes.train_dit import object_contrast
from chaid_lab.shapes.world import (
    BACKGROUND_STYLES,
    DEFAULT_DISTRIBUTION,
    PALETTE,
    render,
    render_with_masks,
    sample_scene,
)

# How each background is named in a prompt.
PHRASES = {"grassy field": "across a grassy field", "ocean": "over the ocean",
           "desert": "over the desert", "snowy field": "over a snowy field",
           "night sky": "in the night sky"}
SHAPES = ("circle", "square", "triangle")


def contrast(parts, scenes: int, seed: int) -> dict[tuple[str, str], list[float]]:
    rng = np.random.default_rng(seed)
    out: dict[tuple[str, str], list[float]] = {}
    done = 0
    while done < scenes:
        scene = sample_scene(rng, DEFAULT_DISTRIBUTION)
        if len(scene.objects) != 1:
            continue
        done += 1
        video, masks = render_with_masks(scene, 16, 64, 64)
        with torch.no_grad():
            z = parts.vae.encode(to_tensor(video)[None])[0]  # (C, T, h, w)
        gap = object_contrast(z, masks)
        if gap is not None:
            out.setdefault((scene.objects[0].colour, scene.background), []).append(gap)
    return out


def jumps(pipeline: Pipeline, colour: str, background: str, seeds: int,
          steps: int | None = None) -> tuple[int, int]:
    """Jumps in ``seeds`` bouncing clips of the pair and in their truths' VAE round trips."""
    model = vae = 0
    for seed in range(seeds):
        turn = SHAPES[seed % 3:] + SHAPES[:seed % 3]
        shape = next(s for s in turn if (s, colour) not in HELD_OUT_OBJECTS)
        prompt = f"a {colour} {shape} bouncing around {PHRASES[background]}"
        req = pipeline.resolve(GenerationRequest(prompt, seed=seed, steps=steps or 30))
        model += largest_blob_jump(pipeline.generate(req).video) > VISIBLE_JUMP_PX
        truth = render(scene_for_prompt(prompt, np.random.default_rng(seed)), req.frames,
                       req.height, req.width)
        vae += largest_blob_jump(round_trip(pipeline, truth)) > VISIBLE_JUMP_PX
    return model, vae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=1500, help="one-object scenes (1500)")
    ap.add_argument("--seeds", type=int, default=0, help="bouncing videos per pair (0: none)")
    ap.add_argument("--steps", type=int, help="denoising steps (default: the preset's 30)")
    ap.add_argument("--weights", type=Path, help="DiT weights (default: the preset's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    parts = build_parts("tiny-shapes", args.weights)
    t0 = time.perf_counter()
    gaps = contrast(parts, args.scenes, seed=0)
    pipeline = Pipeline(parts, torch.device("cpu")) if args.seeds else None
    rows = []
    for background in BACKGROUND_STYLES:
        for colour in PALETTE:
            row = {"colour": colour, "background": background,
                   "contrast": round(float(np.mean(gaps[(colour, background)])), 2),
                   "scenes": len(gaps[(colour, background)]),
                   "held_out": (colour, background) in HELD_OUT_COLOUR_BACKGROUNDS}
            if pipeline is not None:
                row["jumps"], row["vae_jumps"] = jumps(pipeline, colour, background,
                                                       args.seeds, args.steps)
                print(f"{colour} {background}: contrast {row['contrast']}, jumps "
                      f"{row['jumps']}/{args.seeds} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
            rows.append(row)
    rows.sort(key=lambda r: r["contrast"])
    print("\n| colour | background | latent contrast | jumps | VAE round trips |")
    print("|---|---|---|---|---|")
    for r in rows:
        mark = " (held out)" if r["held_out"] else ""
        seen = (f"{r['jumps']} of {args.seeds}", f"{r['vae_jumps']} of {args.seeds}") \
            if "jumps" in r else ("–", "–")
        print(f"| {r['colour']} | {r['background']}{mark} | {r['contrast']:.1f} | "
              f"{seen[0]} | {seen[1]} |")
    report = {"scenes": args.scenes, "seeds": args.seeds, "steps": args.steps, "rows": rows,
              "seconds": round(time.perf_counter() - t0, 1)}
    if pipeline is not None:
        from scipy.stats import spearmanr

        rho, p = spearmanr([r["contrast"] for r in rows], [r["jumps"] for r in rows])
        report["spearman"] = {"rho": round(float(rho), 3), "p": float(p)}
        low = [r for r in rows if r["contrast"] < 7]
        high = [r for r in rows if r["contrast"] >= 7]
        for name, part in (("contrast < 7", low), ("contrast >= 7", high)):
            n = sum(r["jumps"] for r in part)
            print(f"{name}: {len(part)} pairs, jumps {n} of {len(part) * args.seeds} "
                  f"({n / max(1, len(part) * args.seeds):.0%})")
        print(f"Spearman rho(contrast, jumps) = {rho:.3f} (p = {p:.2g}) over {len(rows)} pairs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
