"""The fair queue: users take turns, then a user's connections, then priority and age."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import trio

from chaid.engine.scheduler import FairQueue, QueueFull


@dataclass(eq=False)
class J:
    name: str
    client: tuple
    priority: int = 0


def drain(q: FairQueue) -> list[str]:
    out = []
    while len(q):
        out.append(q.get_nowait().name)
    return out


def test_a_flooding_client_does_not_starve_the_others():
    q = FairQueue(100)
    for i in range(5):
        q.put_nowait(J(f"a{i}", ("alice", 1)))
    q.put_nowait(J("b0", ("bob", 2)))
    q.put_nowait(J("c0", ("carol", 3)))
    q.put_nowait(J("b1", ("bob", 2)))
    assert drain(q) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4"]


def test_a_users_connections_take_turns_within_its_share():
    q = FairQueue(100)
    for i in range(3):
        q.put_nowait(J(f"x{i}", ("alice", 1)))
        q.put_nowait(J(f"y{i}", ("alice", 2)))
    q.put_nowait(J("b0", ("bob", 9)))
    q.put_nowait(J("b1", ("bob", 9)))
    # users alternate; alice's two connections alternate within her turns
    assert drain(q) == ["x0", "b0", "y0", "b1", "x1", "y1", "x2", "y2"]


def test_priority_orders_only_a_clients_own_jobs():
    q = FairQueue(100)
    q.put_nowait(J("a-low", ("alice", 1)))
    q.put_nowait(J("a-high", ("alice", 1), priority=9))
    q.put_nowait(J("a-mid", ("alice", 1), priority=5))
    q.put_nowait(J("b", ("bob", 2)))
    assert drain(q) == ["a-high", "b", "a-mid", "a-low"]


def test_capacity_close_and_depths():
    q = FairQueue(3)
    for i in range(3):
        q.put_nowait(J(str(i), ("u", i % 2)))
    with pytest.raises(QueueFull):
        q.put_nowait(J("x", ("v", 0)))
    assert q.depths() == [{"user": "u", "connection": 0, "queued": 2},
                          {"user": "u", "connection": 1, "queued": 1}]

    async def consume() -> list:
        got = []
        async with trio.open_nursery() as nursery:
            async def reader():
                while (job := await q.get()) is not None:
                    got.append(job.name)
            nursery.start_soon(reader)
            await trio.sleep(0.01)
            q.close()
        return got

    assert trio.run(consume) == ["0", "1", "2"]
    with pytest.raises(RuntimeError):
        q.put_nowait(J("late", ("u", 0)))


def test_get_waits_for_a_job():
    async def main() -> str:
        q = FairQueue(2)
        async with trio.open_nursery() as nursery:
            async def later():
                await trio.sleep(0.05)
                q.put_nowait(J("late", ("u", 1)))
            nursery.start_soon(later)
            job = await q.get()
        return job.name

    assert trio.run(main) == "late"
