"""A real daemon meeting damaged or full storage: it refuses to start with one line that
says what is wrong, serves misses uncached when its disk is full, and never serves a
damaged latent (the entry is quarantined and the request runs as a miss)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
from daemonkit import BASE_ENV, CHAID, REPO, Daemon

from chai_client import Client
from chaid.store.db import LatentDB, latent_key

pytestmark = pytest.mark.integration

RED = "a red circle moving left over a grassy field"
BLUE = "a blue square bouncing over a grassy field"
GREEN = "a green triangle over a grassy field"


def serve_fails(tmp_path: Path, data_dir: Path) -> tuple[int, str]:
    """Start ``chaid serve`` on ``data_dir``; its exit status and output (it must exit)."""
    env = {**os.environ, **BASE_ENV, "PYTHONPATH": str(REPO)}
    done = subprocess.run([*CHAID, "serve", "--model", "tiny-test", "--socket",
                           str(tmp_path / "s.sock"), "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=180, env=env)
    return done.returncode, done.stdout + done.stderr


def test_unwritable_data_dir_is_one_line(tmp_path, tmpfs):
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        code, out = serve_fails(tmp_path, ro / "data")
    assert code == 2 and "Traceback" not in out, out
    assert out.rstrip().splitlines()[-1] == (
        f"chaid: error: cannot create the store in {ro / 'data'}: Read-only file system "
        "(the daemon's user needs write access to store.data_dir)")


def test_damaged_store_is_one_line_with_the_way_out(tmp_path):
    data_dir = tmp_path / "data"
    db = LatentDB(data_dir, embedder=("some-embedder", 8))
    db.close()
    path = data_dir / "lmdb" / "data.mdb"
    os.truncate(path, path.stat().st_size - 4096)
    code, out = serve_fails(tmp_path, data_dir)
    assert code == 65 and "Traceback" not in out, out  # EX_DATAERR: systemd does not retry
    last = out.rstrip().splitlines()[-1]
    assert last.startswith(f"chaid: error: the store at {data_dir} is damaged: data.mdb is "
                           "truncated") and "chaid cache check --repair" in last, last


def _flip_a_latent_byte(data_dir: Path, entry_id: int) -> None:
    """Change one byte in the middle of an entry's first latent, in place (the running
    daemon maps the same pages)."""
    db = LatentDB(data_dir, readonly=True)
    try:
        with db.read() as txn:
            record = db.get_record(txn, entry_id)
            blob = bytes(txn.get(latent_key(entry_id, record.steps[0]), db=db.latents))
    finally:
        db.close()
    path = data_dir / "lmdb" / "data.mdb"
    data = path.read_bytes()
    at = data.find(blob)
    assert at > 0 and data.find(blob, at + 1) < 0
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([data[at + len(blob) // 2] ^ 0x40]), at + len(blob) // 2)
    finally:
        os.close(fd)


def test_damaged_latent_is_quarantined_and_the_hit_runs_as_a_miss(tmp_path):
    daemon = Daemon(tmp_path / "d").start()
    try:
        with Client(daemon.socket) as c:
            first = c.generate(RED)
            assert first.cache == "miss"
            _flip_a_latent_byte(daemon.data_dir, first.inserted["entry_id"])
            second = c.generate(BLUE)  # would hit RED's entry on "grassy field"
            assert second.cache == "miss" and second.steps == 30, second.summary()
            assert second.inserted and second.video[4:8] == b"ftyp"
            cache = c.stats()["cache"]
            assert cache["quarantined"] == 1 and cache["entries"] == 1
            third = c.generate(GREEN)  # the daemon serves on, from the new entry
            assert third.cache == "hit"
            assert third.matched.entry_id == second.inserted["entry_id"]
    finally:
        code = daemon.stop()
    log = daemon.log()
    assert code == 0 and "Traceback" not in log, log
    assert f"cache entry {first.inserted['entry_id']} is damaged" in log


def test_full_disk_returns_the_video_uncached(tmp_path, tmpfs):
    daemon = Daemon(tmp_path / "d")
    with tmpfs(daemon.data_dir, "64m"):
        daemon.start()
        filler = daemon.data_dir / "filler"
        try:
            with Client(daemon.socket) as c:
                assert c.generate(RED).inserted
                with open(filler, "wb") as f, contextlib.suppress(OSError):
                    while True:  # the rest of the disk, as another program would
                        f.write(bytes(1 << 20))
                        f.flush()
                full = c.generate("a purple hexagon in a dark cave")
                assert full.cache == "miss" and full.inserted is None
                assert full.video[4:8] == b"ftyp" and "is full" in full.not_cached
                assert c.stats()["cache"]["write_failures"] == 1
                filler.unlink()
                again = c.generate("an orange triangle under a stormy sky")
                assert again.inserted and again.not_cached is None
                assert c.stats()["cache"]["entries"] == 2
        finally:
            code = daemon.stop()
    log = daemon.log()
    assert code == 0 and "Traceback" not in log, log

