"""Child process of the crash test: writes to a store until it is killed.

Usage: ``python crash_writer.py DATA_DIR SEED START``. Inserts entries ``entry-START``,
``entry-START+1``... and now and then evicts a live one, announcing each operation on
stdout before it starts ("begin insert NAME", "begin evict ID") and after it returns
("done insert NAME ID EVICTED...", "done evict ID"), so the parent knows which operation a
SIGKILL may have interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from storekit import TOY_EMBEDDER, crash_settings, toy_analysis, toy_latents

from chaid.store.cache import LatentCache


def main() -> None:
    data_dir, seed, start = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(seed)
    cache = LatentCache(crash_settings(data_dir), embedder=TOY_EMBEDDER)
    print("ready", flush=True)
    n = start
    while True:
        live = list(cache.policy.catalog)
        if live and rng.random() < 0.25:
            victim = int(rng.choice(live))
            print(f"begin evict {victim}", flush=True)
            cache.evict([victim])
            print(f"done evict {victim}", flush=True)
        else:
            name = f"entry-{n}"
            n += 1
            print(f"begin insert {name}", flush=True)
            res = cache.insert(toy_analysis(name, entities=3), toy_latents(name, CRASH_SHAPE),
                               "fp")
            print(f"done insert {name} {res.entry_id} {' '.join(map(str, res.evicted))}",
                  flush=True)
            if rng.random() < 0.3:
                cache.lookup(toy_analysis(f"entry-{rng.integers(start, n)}", entities=3), "fp",
                             CRASH_SHAPE)


CRASH_SHAPE = (4, 8, 32, 32)

if __name__ == "__main__":
    main()
