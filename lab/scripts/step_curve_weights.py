"""Two DiT weights on the same step-curve pairs: the judge and the Fréchet distance to the
true renders, paired by pair, per method (docs/results.md, "The stage-5 weights").

Both directories are `chaid-lab bench steps` outputs over the same pairs (same --pairs and
--seed), each generated with its own weights; the pairs both hold are compared.

    python lab/scripts/step_curve_weights.py NEW_DIR OLD_DIR [--methods full-30,plain-8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chaid_lab.bench.steps import _distribution, _fd_difference, read_rows
from chaid_lab.stats import paired_difference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("new", type=Path, help="step-curve directory of the new weights")
    ap.add_argument("old", type=Path, help="step-curve directory of the old weights")
    ap.add_argument("--methods", default="full-30,plain-8,chai-8")
    args = ap.parse_args()
    new, old = read_rows(args.new), read_rows(args.old)
    shared = sorted(set(new) & set(old))
    if not shared:
        raise SystemExit("no pair is in both directories")
    for i in shared:
        if new[i]["prompt"] != old[i]["prompt"]:
            raise SystemExit(f"pair {i} differs between the directories: not the same pairs")
    print(f"{len(shared)} pairs; new − old, paired 95% bootstrap intervals")
    print("| method | judge new / old | judge new − old | FD new / old | FD new − old |")
    print("|---|---|---|---|---|")
    for m in args.methods.split(","):
        rows = [{"features": {"new": new[i]["features"][m], "old": old[i]["features"][m],
                              "truth": new[i]["features"]["truth"]}} for i in shared]
        dist = _distribution(rows, ["new", "old"], seed=0)
        fd = _fd_difference(dist["fd_boot"], "new", "old",
                            dist["fd"]["new"] - dist["fd"]["old"], len(rows))
        a = [new[i]["methods"][m]["judge"] for i in shared]
        b = [old[i]["methods"][m]["judge"] for i in shared]
        j = paired_difference(a, b)
        print(f"| {m} | {sum(a) / len(a):.3f} / {sum(b) / len(b):.3f} | {j.mean:+.4f} "
              f"[{j.low:+.4f}, {j.high:+.4f}] {j.verdict} | {dist['fd']['new']:.2f} / "
              f"{dist['fd']['old']:.2f} | {fd.mean:+.2f} [{fd.low:+.2f}, {fd.high:+.2f}] "
              f"{fd.verdict} |")


if __name__ == "__main__":
    main()
