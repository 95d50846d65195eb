"""``chaid cache ...`` through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from storekit import TOY_EMBEDDER, toy_analysis, toy_latents, toy_settings

from chaid.cli import main
from chaid.store.cache import LatentCache


@pytest.fixture
def store(tmp_path):
    settings = toy_settings(tmp_path)
    with LatentCache(settings, embedder=TOY_EMBEDDER) as cache:
        ids = [cache.insert(toy_analysis(f"prompt {i}"), toy_latents(f"prompt {i}"),
                            "fp").entry_id for i in range(6)]
        cache.evict(ids[:2])
    return settings.data_dir, ids[2:]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_ls_show(store, capsys):
    data_dir, ids = store
    code, out, _ = run(capsys, "cache", "stats", "--data-dir", str(data_dir), "--json")
    stats = json.loads(out)
    assert code == 0 and stats["entries"] == 4 and stats["latents"] == 12
    assert stats["namespaces"] == {"fp 4x3x8x8": 4}
    code, out, _ = run(capsys, "cache", "ls", "--data-dir", str(data_dir), "--json")
    assert sorted(r["id"] for r in json.loads(out)) == ids
    code, out, _ = run(capsys, "cache", "show", str(ids[0]), "--data-dir", str(data_dir))
    assert "checksum ok" in out and "prompt 2" in out


def test_evict_check_compact(store, capsys):
    data_dir, ids = store
    code, out, _ = run(capsys, "cache", "evict", str(ids[0]), "--data-dir", str(data_dir))
    assert code == 0 and f"[{ids[0]}]" in out
    code, out, _ = run(capsys, "cache", "check", "--data-dir", str(data_dir), "--json")
    assert code == 0 and json.loads(out)["ok"] and json.loads(out)["entries"] == 3
    code, out, _ = run(capsys, "cache", "compact", "--data-dir", str(data_dir))
    assert code == 0 and "compacted" in out
    code, out, _ = run(capsys, "cache", "check", "--data-dir", str(data_dir), "--json")
    assert json.loads(out)["ok"] and json.loads(out)["entries"] == 3


def test_errors_are_one_line(tmp_path, store, capsys):
    data_dir, _ = store
    code, _, err = run(capsys, "cache", "show", "999", "--data-dir", str(data_dir))
    assert code != 0 and err.strip() == "chaid: error: no cache entry 999"
    code, _, err = run(capsys, "cache", "stats", "--data-dir", str(tmp_path / "nothing"))
    assert code != 0 and err.count("\n") == 1 and "no store" in err
    with LatentCache(toy_settings(tmp_path), embedder=TOY_EMBEDDER):  # a running "daemon"
        code, _, err = run(capsys, "cache", "evict", "--all", "--data-dir", str(data_dir))
    assert code != 0 and "open for writing by another process" in err


def test_cli_import_stays_light():
    code = ("import sys, chaid.cli; heavy = {'lmdb', 'spacy', 'torch', 'annoy', "
            "'sentence_transformers'} & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
