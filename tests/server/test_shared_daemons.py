"""Two real daemons sharing one real redis-server: a miss on one is a hit on the other;
with Redis gone both keep serving; stats say so."""

from __future__ import annotations

import time

import pytest
from daemonkit import Daemon

from chai_client import Client

pytestmark = pytest.mark.integration

RED = "a red circle moving left over a grassy field"
BLUE = "a blue square bouncing over a grassy field"


def test_a_miss_on_one_daemon_is_a_hit_on_another(tmp_path, redis_server):
    config = f'[store]\nshared_url = "{redis_server.url}"\n'
    a = Daemon(tmp_path / "a", config=config).start()
    b = Daemon(tmp_path / "b", config=config).start()
    try:
        with Client(a.socket) as ca, Client(b.socket) as cb:
            miss = ca.generate(RED)
            assert miss.cache == "miss"
            deadline = time.monotonic() + 20
            while cb.stats()["shared"]["imported"] < 1:
                assert time.monotonic() < deadline, cb.stats()["shared"]
                time.sleep(0.1)
            hit = cb.generate(BLUE)
            assert hit.cache == "hit" and hit.steps == 8
            shared = cb.stats()["shared"]
            assert shared["available"] and shared["fetched"] == 1
            assert ca.stats()["shared"]["published"] == 1
            # Redis gone: both serve on, from their local tiers, and say so.
            redis_server.stop()
            again = cb.generate(BLUE, seed=1)
            assert again.cache == "hit"  # the fetched latents are local now
            other = ca.generate("a green triangle in the desert")
            assert other.cache == "miss" and other.inserted is not None
            deadline = time.monotonic() + 20
            while ca.stats()["shared"]["available"]:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert ca.stats()["shared"]["pending"] == 1
    finally:
        assert a.stop() == 0 and b.stop() == 0
    assert "shared tier" in a.log() and "unavailable" in a.log()


def test_exact_repeats_skip_the_denoising_here_and_on_another_daemon(tmp_path, redis_server):
    """The same request again is answered from its final latent: the same video, no steps;
    through the shared tier, on another daemon too. refresh always runs."""
    config = f'[store]\nshared_url = "{redis_server.url}"\n'
    a = Daemon(tmp_path / "a", config=config).start()
    b = Daemon(tmp_path / "b", config=config).start()
    try:
        with Client(a.socket) as ca, Client(b.socket) as cb:
            first = ca.generate(RED, seed=5, format="frames")
            again = ca.generate(RED, seed=5, format="frames")
            assert (first.cache, again.cache, again.steps, again.mode) == (
                "miss", "repeat", 0, "replay")
            assert (again.video == first.video).all()
            assert again.timings["total_ms"] < first.timings["total_ms"]
            mp4 = ca.generate(RED, seed=5)  # the other format, from the same latent
            assert mp4.cache == "repeat" and mp4.video[4:8] == b"ftyp"
            assert ca.generate(RED, seed=6).cache != "repeat"  # another seed is another video
            assert ca.generate(RED, seed=5, cache="refresh").cache == "miss"
            off = ca.generate(RED, seed=5, cache="off", steps=3)
            assert off.cache == "off" and ca.generate(RED, seed=5, cache="off",
                                                      steps=3).cache == "repeat"
            r = redis_server.client()
            deadline = time.monotonic() + 20
            while len(r.keys("chaid:r:*")) < 3:  # final latents reach Redis in the background
                assert time.monotonic() < deadline
                time.sleep(0.1)
            elsewhere = cb.generate(RED, seed=5, format="frames")
            assert elsewhere.cache == "repeat" and (elsewhere.video == first.video).all()
            assert cb.stats()["repeats"]["served_shared"] == 1
    finally:
        assert a.stop() == 0 and b.stop() == 0
