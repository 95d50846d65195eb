"""A store opened with another embedder re-embeds its entries' text, all at once or not at
all: with the real MiniLM and static embedders, and with a re-embedding process SIGKILLed."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from storekit import TOY_EMBEDDER, toy_analysis, toy_latents, toy_settings

from chaid.store import db as dbm
from chaid.store.cache import LatentCache
from chaid.store.errors import StoreMismatchError
from chaid.store.settings import StoreSettings

REPO = Path(__file__).resolve().parents[2]
SHAPE = (4, 3, 8, 8)
PROMPTS = ["a red fox running through a snowy forest", "a sailboat on a calm lake at dawn",
           "an old man playing chess in a park"]


def _vectors_match_meta(data_dir: Path) -> tuple[str, int]:
    """The store's recorded embedder and dimension, after checking that every stored vector
    has that dimension and the total is the sum of the records' bytes."""
    store = dbm.LatentDB(data_dir, readonly=True)
    try:
        meta = store.read_meta()
        with store.read() as txn:
            dims = {dbm.parse_vector(v)[2].size for _, v in txn.cursor(db=store.vectors)}
            dims |= {len(v) // 4 for _, v in txn.cursor(db=store.prompts)}
            records = list(store.iter_records(txn))
            # each entry's bytes: its latents plus a float32 vector per entity and prompt
            wrong = [r.entry_id for r in records if r.bytes != 4 * meta["dim"] * (
                len(r.item_ids) + 1) + sum(len(txn.get(dbm.latent_key(r.entry_id, s),
                                                       db=store.latents)) for s in r.steps)]
    finally:
        store.close()
    assert dims == {meta["dim"]}
    assert sum(r.bytes for r in records) == meta["total_bytes"]
    assert not wrong, wrong[:5]
    return meta["embedder"], meta["dim"]


def test_a_store_moves_between_embedders_and_keeps_its_entries(tmp_path, analyzer,
                                                               minilm_analyzer, caplog):
    settings = StoreSettings(data_dir=tmp_path / "store", map_bytes=1 << 20)
    latents = {s: np.random.default_rng(s).standard_normal(SHAPE).astype(np.float32)
               for s in (2, 3, 4)}
    with LatentCache.open(settings, minilm_analyzer) as cache:
        ids = [cache.insert(p, latents, "fp").entry_id for p in PROMPTS]
        before = {r.entry_id: r.bytes for r in cache.records()}
        hit = cache.lookup("a grey fox in a snowy forest", "fp", SHAPE, touch=False)
    assert hit.hit and hit.entry_id == ids[0]
    assert _vectors_match_meta(settings.data_dir)[1] == 384

    with caplog.at_level("WARNING", logger="chaid.store"):
        cache = LatentCache.open(settings, analyzer)  # the static default
    with cache:
        assert "re-embedding" in caplog.text
        assert cache.dim == 256 and len(cache) == 3
        res = cache.lookup("a grey fox in a snowy forest", "fp", SHAPE, touch=False)
        assert res.hit and res.entry_id == ids[0]
        for entry_id in ids:  # latents untouched, bytes shrunk by the smaller vectors
            got = cache.get_latents(entry_id)
            assert all(np.array_equal(got[s], latents[s].astype(np.float16)) for s in latents)
            record = cache.get_record(entry_id)
            assert before[entry_id] - record.bytes == 4 * (384 - 256) * (
                len(record.entities) + 1)
    assert _vectors_match_meta(settings.data_dir) == (analyzer.embedder.name, 256)

    caplog.clear()
    with caplog.at_level("WARNING", logger="chaid.store"):
        LatentCache.open(settings, analyzer).close()  # the same embedder: nothing to do
    assert "re-embedding" not in caplog.text
    refusing = dataclasses.replace(settings, reembed=False)
    with pytest.raises(StoreMismatchError, match="built with the embedder .*store.reembed"):
        LatentCache.open(refusing, minilm_analyzer)
    assert _vectors_match_meta(settings.data_dir)[1] == 256  # refused: nothing changed
    with LatentCache.open(settings, minilm_analyzer) as cache:  # and back again
        assert cache.lookup("a grey fox in a snowy forest", "fp", SHAPE,
                            touch=False).entry_id == ids[0]
    assert _vectors_match_meta(settings.data_dir)[1] == 384


REEMBED_SCRIPT = """
import sys
from pathlib import Path
from chaid.store.analysis import Embedder
from chaid.store.reembed import reembed
embedder = Embedder(kind="minilm-static")
print("ready", flush=True)
reembed(Path(sys.argv[1]), embedder, map_bytes=1 << 20)
print("done", flush=True)
"""


@pytest.mark.integration
def test_a_killed_reembed_leaves_the_old_store_or_the_new_one(tmp_path):
    settings = toy_settings(tmp_path, rebuild_every=100_000)
    with LatentCache(settings, embedder=TOY_EMBEDDER) as cache:
        for i in range(1500):
            cache.insert(toy_analysis(f"prompt number {i} of a fox", entities=3),
                         toy_latents(f"p{i}", shape=(1, 1, 2, 2), steps=(2,)), "fp")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", REEMBED_SCRIPT, str(settings.data_dir)],
                                stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.0, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        name, dim = _vectors_match_meta(settings.data_dir)
        seen.add(dim)
        if dim == 256:
            break
    assert seen <= {16, 256}
    # Whatever the kills left, the store opens with the static embedder and keeps them all.
    from chaid.store.analysis import Analyzer

    static = Analyzer.from_settings(StoreSettings(embedder_threads=1))
    with LatentCache.open(toy_settings(tmp_path, rebuild_every=100_000), static) as cache:
        assert len(cache) == 1500 and cache.dim == 256
    assert _vectors_match_meta(settings.data_dir)[1] == 256
