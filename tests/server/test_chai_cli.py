"""The `chai` command and the daemon's start-up as a newcomer meets them: the version, a hint
when no daemon runs, options after the command, outputs checked before any work, `-o -`,
`cache warm`, a confirmed `cache clear`, and a second daemon on a busy socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from daemonkit import BASE_ENV, CHAID, REPO, Daemon

from chai_client import Client, __version__

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("chai-cli")).start()
    yield d
    d.stop()


def chai(*args: str, socket=None, stdin: str | None = None, timeout: float = 120):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CHAI_SOCKET", None)
    if socket is not None:
        env["CHAI_SOCKET"] = str(socket)
    return subprocess.run([sys.executable, "-m", "chai_client.cli", *args], env=env,
                          capture_output=True, timeout=timeout, input=stdin,
                          text=stdin is not None)


def generations(daemon) -> int:
    with Client(daemon.socket) as c:
        return sum(c.stats()["generations"].values())


def test_version_and_the_hint_without_a_daemon(tmp_path):
    run = chai("--version")
    assert run.returncode == 0 and run.stdout.decode().strip() == f"chai {__version__}"
    run = chai("ping", "--socket", str(tmp_path / "none.sock"))
    err = run.stderr.decode()
    assert run.returncode == 3
    assert "cannot connect to" in err and "chaid serve" in err and "CHAI_SOCKET" in err
    assert "Traceback" not in err


def test_every_option_has_help():
    from chai_client.cli import build_parser

    def walk(parser):
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (parser.prog, action.option_strings)
            for sub in getattr(action, "choices", None) or {}:
                if isinstance(action.choices, dict):
                    walk(action.choices[sub])

    walk(build_parser())


def test_connection_options_after_the_command(daemon, tmp_path):
    run = chai("ping", "--socket", str(daemon.socket))
    assert run.returncode == 0, run.stderr
    run = chai("--socket", str(tmp_path / "x.sock"), "stats", "--socket", str(daemon.socket),
               "--json")
    assert run.returncode == 0 and json.loads(run.stdout)["model"] == "tiny-test"
    # given only before the command, it is not reset by the command's own default
    run = chai("--socket", str(daemon.socket), "cache", "ls")
    assert run.returncode == 0, run.stderr


def test_output_is_checked_before_generating(daemon, tmp_path):
    before = generations(daemon)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [(tmp_path, "is a directory"), (tmp_path / "file.txt" / "v.mp4", "not a directory")]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((locked / "v.mp4", "no write permission"))
    (tmp_path / "file.txt").write_text("x")
    for path, why in cases:
        run = chai("generate", "a red circle", "-o", str(path), socket=daemon.socket)
        assert run.returncode == 2 and why in run.stderr.decode(), run.stderr
        assert "Traceback" not in run.stderr.decode()
    assert generations(daemon) == before  # nothing was generated


def test_output_to_stdout(daemon):
    run = chai("generate", "a blue square in the night sky", "-o", "-", "--cache", "off",
               "--steps", "2", "--json", socket=daemon.socket)
    assert run.returncode == 0, run.stderr
    assert run.stdout[4:8] == b"ftyp"  # the MP4 itself
    facts = json.loads(run.stderr.decode().strip().splitlines()[-1])
    assert facts["output"] == "-" and facts["steps"] == 2
    assert not (REPO / "-").exists()


def test_cache_warm_then_clear_with_confirmation(daemon):
    run = chai("cache", "warm", "an orange star in a dark cave", "--json",
               socket=daemon.socket)
    assert run.returncode == 0, run.stderr
    warmed = json.loads(run.stdout)
    assert warmed["entry_id"] >= 1 and warmed["steps"] == 30
    run = chai("lookup", "an orange star", socket=daemon.socket)
    assert f"hit: entry {warmed['entry_id']}" in run.stdout.decode()
    # not a terminal, no --yes: refused, nothing removed
    run = chai("cache", "clear", socket=daemon.socket, stdin="y\n")
    assert run.returncode == 2 and "--yes" in run.stderr
    with Client(daemon.socket) as c:
        assert c.stats()["cache"]["entries"] >= 1
    run = chai("cache", "clear", "--yes", socket=daemon.socket)
    assert run.returncode == 0 and "evicted" in run.stdout.decode()
    with Client(daemon.socket) as c:
        assert c.stats()["cache"]["entries"] == 0


def test_a_second_daemon_on_a_busy_socket_is_refused_before_loading(daemon, tmp_path):
    """The path is checked before the store opens and the model loads."""
    other_data = tmp_path / "second-data"
    env = {**os.environ, **BASE_ENV, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    run = subprocess.run([*CHAID, "serve", "--model", "tiny-shapes", "--socket",
                          str(daemon.socket), "--data-dir", str(other_data)],
                         capture_output=True, text=True, env=env, timeout=120)
    took = time.perf_counter() - t0
    assert run.returncode == 2
    assert "in use by a running daemon" in run.stderr and "Traceback" not in run.stderr
    assert not other_data.exists()  # neither store nor model was touched
    print(f"refused in {took:.1f} s")
    with Client(daemon.socket) as c:  # and the first daemon serves on
        assert c.ping()


def test_what_the_model_understood(tmp_path):
    """tiny-shapes knows its world's words: a prompt it cannot draw is generated with a
    warning and kept out of the cache; `chai lookup` shows the same reading."""
    shapes = Daemon(tmp_path / "shapes", args=["--model", "tiny-shapes"]).start()
    try:
        with Client(shapes.socket) as c:
            cat = c.generate("a cat playing piano")
            assert cat.understood == {"known": [], "unknown": ["cat", "playing", "piano"],
                                      "drawable": False}
            assert cat.cache == "miss" and cat.inserted is None
            assert "cannot draw" in cat.not_cached
            fox = c.generate("a red fox in a snowy forest")
            assert fox.understood["drawable"] and fox.understood["unknown"] == ["fox", "forest"]
            assert "red → colour red" in fox.understood["known"]
            assert fox.inserted is not None  # partly understood: cached
            assert c.stats()["cache"]["entries"] == 1
            # a hit on tiny-shapes runs 8 plain steps (chai.cache_attention = auto: off)
            hit = c.generate("a red square over a snowy forest")
            assert hit.cache == "hit" and hit.mode == "plain" and hit.steps == 8
            assert c.stats()["hit"] == {"steps": 8, "cache_attention": False}
        run = chai("generate", "一只猫在弹钢琴", "-o", str(tmp_path / "zh.mp4"),
                   socket=shapes.socket)
        err = run.stderr.decode()
        assert run.returncode == 0 and "cannot draw anything" in err and "一只猫在弹钢琴" in err
        run = chai("lookup", "a kitten playing a keyboard", socket=shapes.socket)
        out = run.stdout.decode()
        assert "understood: (nothing)" in out and "does not know: kitten, playing, keyboard" in out
        assert "cannot draw" in shapes.log()  # and the daemon logs it
    finally:
        shapes.stop()
