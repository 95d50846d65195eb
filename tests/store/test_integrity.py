"""Damaged stores: a truncated file, a damaged tree page, damaged latent bytes, a full disk,
an unwritable directory. Each is refused or quarantined with a message that says what is
wrong; ``chaid cache check --repair`` salvages every intact entry and nothing else."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from storekit import TOY_EMBEDDER, toy_analysis, toy_latents, toy_settings

from chaid.store.cache import LatentCache
from chaid.store.codec import checksum
from chaid.store.datafile import inspect_data_file
from chaid.store.db import LMDB_DIRNAME, EntryRecord
from chaid.store.errors import CorruptEntryError, StoreCorruptError, StoreError, StoreFullError
from chaid.store.integrity import latent_problem

REPO = Path(__file__).resolve().parents[2]
# fp16 latents of 3,072 bytes: each one on overflow pages of its own, so the latents' tree
# has leaf pages that hold only keys and page numbers.
SHAPE = (4, 3, 16, 16)
ENTRIES = 40
PAGE = 4096
_P_LEAF = 0x02


def fill(tmp_path: Path, n: int = ENTRIES, **overrides):
    settings = toy_settings(tmp_path, **overrides)
    with LatentCache(settings, embedder=TOY_EMBEDDER) as cache:
        for i in range(n):
            cache.insert(toy_analysis(f"p{i}"), toy_latents(f"p{i}", SHAPE), "fp")
    return settings


def data_file(settings) -> Path:
    return Path(settings.data_dir) / LMDB_DIRNAME / "data.mdb"


def stored(prompt: str) -> dict[int, bytes]:
    return {s: a.astype(np.float16).tobytes() for s, a in toy_latents(prompt, SHAPE).items()}


def assert_intact(cache: LatentCache) -> set[int]:
    """Every entry of ``cache`` reads back byte-identical to what was written, is found by
    its own lookup, and the store is consistent; the ids."""
    ids = set()
    for record in list(cache.records()):
        got = cache.get_latents(record.entry_id)
        assert {s: a.tobytes() for s, a in got.items()} == stored(record.prompt)
        found = cache.lookup(toy_analysis(record.prompt), "fp", SHAPE, touch=False)
        assert found.hit and found.entry_id == record.entry_id
        ids.add(record.entry_id)
    report = cache.check()
    assert report.ok, report.problems
    return ids


def chaid(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "chaid", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def leaf_pages_with_key_size(path: Path, key_size: int) -> list[int]:
    """Page numbers of B-tree leaves whose first key is ``key_size`` bytes long (12: the
    latents' keys, entry id and step)."""
    data = path.read_bytes()
    found = []
    for pgno in range(2, len(data) // PAGE):
        page = data[pgno * PAGE:(pgno + 1) * PAGE]
        flags, lower = struct.unpack_from("<HH", page, 10)
        if flags != _P_LEAF or lower <= 16:
            continue
        (node,) = struct.unpack_from("<H", page, 16)
        if node + 8 <= PAGE and struct.unpack_from("<H", page, node + 6)[0] == key_size:
            found.append(pgno)
    return found


def test_truncated_file_is_refused_with_a_message_not_a_sigbus(tmp_path):
    settings = fill(tmp_path)
    path = data_file(settings)
    size = path.stat().st_size
    os.truncate(path, size // 2)
    # Before LMDB maps the file: without the meta-page check this is SIGBUS (rc -7).
    out = chaid("cache", "check", "--data-dir", str(settings.data_dir))
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
    assert f"data.mdb is truncated ({size // 2} bytes; its last commit needs {size})" in \
        out.stdout
    assert "--repair" in out.stdout and "Traceback" not in out.stderr
    with pytest.raises(StoreCorruptError, match="truncated"):
        LatentCache(settings, embedder=TOY_EMBEDDER)

    out = chaid("cache", "check", "--repair", "--json", "--data-dir", str(settings.data_dir))
    assert out.returncode == 0, out.stderr[-2000:]
    kept = [p for p in path.parent.iterdir() if p.name.startswith("data.mdb.damaged-")]
    assert len(kept) == 1 and kept[0].stat().st_size == size // 2  # kept as it was
    # Whatever the repair kept is intact; the store opens and accepts writes again.
    with LatentCache(settings, embedder=TOY_EMBEDDER) as cache:
        before = assert_intact(cache)
        cache.insert(toy_analysis("after"), toy_latents("after", SHAPE), "fp")
        after = assert_intact(cache)
    assert before < after and len(after) == len(before) + 1


def test_a_file_that_lost_its_last_pages_is_salvaged_from_the_commit_before(tmp_path):
    # The last commit's pages sit at the end of the file: cutting two pages loses the
    # newest snapshot's catalog, and the repair falls back to the snapshot before it, which
    # LMDB keeps whole until the next commit. Only the last insert is lost.
    settings = fill(tmp_path, 12)
    path = data_file(settings)
    os.truncate(path, path.stat().st_size - 2 * PAGE)
    out = chaid("cache", "check", "--repair", "--json", "--data-dir", str(settings.data_dir))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["entries"] == 11, report
    with LatentCache(settings, embedder=TOY_EMBEDDER) as cache:
        ids = assert_intact(cache)
        assert ids == set(range(1, 12))
        cache.insert(toy_analysis("after"), toy_latents("after", SHAPE), "fp")
        assert len(assert_intact(cache)) == 12


def test_damaged_tree_page_is_found_at_open_and_salvaged(tmp_path):
    n = 100  # 300 latents: a tree of several leaves under a branch page
    settings = fill(tmp_path, n)
    path = data_file(settings)
    # One live leaf of the latents' tree zeroed (a lost write); the file also holds stale
    # copies of leaves that earlier commits replaced, which LMDB no longer reads.
    for pgno in reversed(leaf_pages_with_key_size(path, 12)):
        with open(path, "r+b") as f:
            f.seek(pgno * PAGE)
            page = f.read(PAGE)
            f.seek(pgno * PAGE)
            f.write(bytes(PAGE))
        try:
            LatentCache(settings, embedder=TOY_EMBEDDER).close()
        except StoreCorruptError as exc:
            assert "the latents database is damaged" in str(exc) and "--repair" in str(exc)
            break
        with open(path, "r+b") as f:  # a stale page: put it back
            f.seek(pgno * PAGE)
            f.write(page)
    else:
        pytest.fail("no live leaf of the latents' tree was found")
    out = chaid("cache", "check", "--data-dir", str(settings.data_dir))
    assert out.returncode == 1 and "latents database is damaged" in out.stdout, out
    # the read-only tools walk the trees first: one clear error, not an abort halfway
    for argv in (["ls"], ["stats"], ["show", "1"]):
        out = chaid("cache", *argv, "--data-dir", str(settings.data_dir))
        assert out.returncode > 0 and "latents database is damaged" in out.stderr, (argv, out)
        assert "--repair" in out.stderr and "Traceback" not in out.stderr

    out = chaid("cache", "check", "--repair", "--json", "--data-dir", str(settings.data_dir))
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    lost = {int(k) for k in report["lost"]}
    assert report["ok"] and 1 <= len(lost) < n // 2, report
    assert report["entries"] + len(lost) == n
    with LatentCache(settings, embedder=TOY_EMBEDDER) as cache:
        kept = assert_intact(cache)
    assert kept == set(range(1, n + 1)) - lost


def test_damaged_latent_is_never_served_and_is_quarantined(tmp_path):
    settings = fill(tmp_path)
    path = data_file(settings)
    victim = 7
    blob = stored(f"p{victim - 1}")[3]
    data = path.read_bytes()
    at = data.find(blob)
    assert at > 0 and data.find(blob, at + 1) < 0
    with open(path, "r+b") as f:  # one byte in the middle of entry 7's latent of step 3
        f.seek(at + len(blob) // 2)
        f.write(bytes([data[at + len(blob) // 2] ^ 0x40]))
    with LatentCache(settings, embedder=TOY_EMBEDDER) as cache:  # the trees are sound
        with pytest.raises(CorruptEntryError, match="entry 7 .*step 3 checksum mismatch"):
            cache.get_latents(victim)
        report = cache.check()
        assert report.problems == ["entry 7: latent of step 3 checksum mismatch"]
        assert cache.quarantine(victim, "checksum mismatch")
        assert cache.stats()["quarantined"] == 1
        miss = cache.lookup(toy_analysis(f"p{victim - 1}"), "fp", SHAPE, touch=False)
        assert miss.entry_id != victim
        assert assert_intact(cache) == set(range(1, ENTRIES + 1)) - {victim}


def test_check_repair_evicts_a_damaged_entry_and_nothing_else(tmp_path):
    settings = fill(tmp_path, n=6)
    path = data_file(settings)
    blob = stored("p2")[2]
    data = path.read_bytes()
    at = data.find(blob)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes(16))
    out = chaid("cache", "check", "--repair", "--json", "--data-dir", str(settings.data_dir))
    report = json.loads(out.stdout)
    assert out.returncode == 0 and any("evicted 1 damaged entries (3)" in r
                                       for r in report["repaired"]), report
    with LatentCache(settings, embedder=TOY_EMBEDDER) as cache:
        assert assert_intact(cache) == {1, 2, 4, 5, 6}


def test_latent_problem_checks_length_dtype_and_checksum():
    raw = np.zeros(SHAPE, np.float16).tobytes()
    record = EntryRecord(entry_id=1, prompt="p", entities=[], item_ids=[], fingerprint="fp",
                         shape=list(SHAPE), dtype="float16", steps=[2],
                         checksums={"2": checksum(raw)}, created=0.0, last_access=0.0)
    assert latent_problem(record, 2, raw) is None
    assert "bytes, not" in latent_problem(record, 2, raw[:-2])
    assert "checksum mismatch" in latent_problem(record, 2, b"\x01" + raw[1:])
    record.dtype = "float64"
    assert "unusable dtype or shape" in latent_problem(record, 2, raw)
    record.dtype, record.shape = "float16", [4, -3, 16, 16]
    assert "unusable dtype or shape" in latent_problem(record, 2, raw)


def test_meta_pages_are_read_without_lmdb(tmp_path):
    settings = fill(tmp_path, n=3)
    state = inspect_data_file(data_file(settings))
    assert state.page_size == PAGE and not state.truncated
    assert state.needed == data_file(settings).stat().st_size
    with open(data_file(settings), "r+b") as f:
        f.seek(PAGE + 16)  # the second meta page's magic
        f.write(b"\0\0\0\0")
    with pytest.raises(StoreCorruptError, match="meta page 1 of data.mdb is damaged"):
        LatentCache(settings, embedder=TOY_EMBEDDER)


def test_full_disk_is_store_full_and_loses_nothing(tmp_path, tmpfs):
    with tmpfs(tmp_path / "fs", "4m") as fs:
        settings = toy_settings(fs, map_bytes=8 << 20)
        with LatentCache(settings, embedder=TOY_EMBEDDER) as cache:
            for i in range(5):
                cache.insert(toy_analysis(f"p{i}"), toy_latents(f"p{i}", SHAPE), "fp")
            filler = fs / "filler"
            with open(filler, "wb") as f:  # the rest of the disk, as another program would
                with contextlib.suppress(OSError):
                    while True:
                        f.write(bytes(1 << 16))
                        f.flush()
            # tmpfs fails LMDB's page writes with EIO, not ENOSPC: still a full disk.
            with pytest.raises(StoreFullError, match="disk under .* is full"):
                for i in range(5, 50):
                    cache.insert(toy_analysis(f"p{i}"), toy_latents(f"p{i}", SHAPE), "fp")
            written = len(cache)
            filler.unlink()
            cache.insert(toy_analysis("after"), toy_latents("after", SHAPE), "fp")
            assert len(cache) == written + 1
            assert_intact(cache)


def test_unwritable_data_dir_is_one_clear_error(tmp_path, tmpfs):
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        settings = toy_settings(ro)
        with pytest.raises(StoreError, match="cannot create the store in .*Read-only file "
                                             "system .*write access to store.data_dir"):
            LatentCache(settings, embedder=TOY_EMBEDDER)
