"""A batching device worker (``server.max_batch`` > 1): jobs join the batch in flight, each
gets what it would get alone, a cancelled job leaves the batch within one step while the
others go on, and the cache writes and outcomes are those of jobs run one at a time."""

from __future__ import annotations

import pytest
import torch
import trio

from chaid.config import load_settings
from chaid.engine.chai import ChaiEngine
from chaid.engine.worker import Job, JobState, WorkerPool
from chaid.modes import CacheMode, Outcome

RED = "a red circle moving left over a grassy field"
BLUE = "a blue square bouncing over a grassy field"
GREEN = "a green triangle sliding down over a grassy field"
PURPLE = "a purple star over the desert at night"


def open_engine(path, cache_attention: str = "auto") -> ChaiEngine:
    return ChaiEngine.load(load_settings(None, overrides={
        "model": {"name": "tiny-test", "device": "cpu"},
        "store": {"data_dir": path / "cache"},
        "chai": {"cache_attention": cache_attention}}))


@pytest.fixture
def engine(tmp_path):
    engine = open_engine(tmp_path)
    yield engine
    engine.close()


def job(engine: ChaiEngine, prompt: str, mode: CacheMode = CacheMode.AUTO, seed: int = 0,
        steps: int = 30, client: int = 0, on_progress=None) -> Job:
    return Job(engine.resolve(prompt, seed=seed, steps=steps), mode, client=(0, client),
               on_progress=on_progress)


def run_pool(engine: ChaiEngine, jobs: list[Job], max_batch: int,
             during=None) -> WorkerPool:
    """Submit ``jobs`` at once to a one-worker pool and run it until they are all done;
    ``during(pool, jobs)`` runs beside the pool (async)."""
    pool = WorkerPool([engine], queue_size=64, lookup_limiter=trio.CapacityLimiter(2),
                      max_batch=max_batch)
    steps_seen: list[int] = []
    worker = pool.workers[0]
    step = engine.pipeline.step

    def counting_step(runs):
        steps_seen.append(len(runs))
        return step(runs)

    engine.pipeline.step = counting_step
    try:
        async def main():
            async with trio.open_nursery() as nursery:
                for j in jobs:
                    pool.submit(j)
                nursery.start_soon(pool.run)
                if during is not None:
                    await during(pool, jobs)
                pool.close()
        trio.run(main)
    finally:
        del engine.pipeline.step
    worker.steps_seen = steps_seen
    return pool


@pytest.mark.parametrize(("cache_attention", "widest"), [("off", 4), ("on", 4)])
def test_a_batch_gives_each_job_what_it_gets_alone(tmp_path, cache_attention, widest):
    # The miss writes the entry the hits read; then two hits (with Cache Attention on the
    # entry's latents, or plain), a plain 12-step job and a refresh (30 steps, capturing)
    # share one worker's model calls.
    def mixed(engine):
        return [job(engine, BLUE, seed=1, client=1), job(engine, GREEN, seed=2, client=2),
                job(engine, PURPLE, CacheMode.OFF, seed=3, steps=12, client=3),
                job(engine, RED, CacheMode.REFRESH, seed=4, client=4)]

    runs = {}
    for name, max_batch in (("batched", 4), ("alone", 1)):
        engine = open_engine(tmp_path / name, cache_attention)
        try:
            assert run_pool(engine, [job(engine, RED)], max_batch).counts[Outcome.MISS] == 1
            jobs = mixed(engine)
            runs[name] = jobs, run_pool(engine, jobs, max_batch)
        finally:
            engine.close()
    (batched, pool), (alone, solo) = runs["batched"], runs["alone"]
    assert max(pool.workers[0].steps_seen) == widest  # they did share model calls
    assert set(solo.workers[0].steps_seen) == {1}
    for got, ref in zip(batched, alone, strict=True):
        assert got.state is JobState.DONE and ref.state is JobState.DONE
        a, b = got.outcome, ref.outcome
        assert (a.outcome, a.result.steps, a.result.run) == (b.outcome, b.result.steps,
                                                             b.result.run)
        assert (a.result.latent - b.result.latent).abs().max().item() <= 1e-4
        assert sorted(a.result.captured) == sorted(b.result.captured)
    outcomes = [j.outcome.outcome for j in batched]
    assert outcomes == [Outcome.HIT, Outcome.HIT, Outcome.OFF, Outcome.MISS]
    assert batched[3].outcome.inserted is not None  # the refresh wrote its entry
    assert pool.counts[Outcome.HIT] == 2 and pool.counts["failed"] == 0


def test_a_job_joins_the_batch_in_flight(engine):
    early = job(engine, RED, CacheMode.OFF, steps=30)
    late = job(engine, BLUE, CacheMode.OFF, seed=1, steps=8, client=1)
    pool = WorkerPool([engine], queue_size=8, lookup_limiter=trio.CapacityLimiter(2),
                      max_batch=4)
    sizes: list[int] = []
    step = engine.pipeline.step
    engine.pipeline.step = lambda runs: (sizes.append(len(runs)), step(runs))[1]

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run)
            pool.submit(early)
            while early.steps_done < 5:
                await trio.sleep(0.001)
            pool.submit(late)
            pool.close()
    try:
        trio.run(main)
    finally:
        del engine.pipeline.step
    assert early.state is late.state is JobState.DONE
    # early ran alone, then with late for late's 8 steps, then alone again
    assert sizes[0] == 1 and sizes.count(2) == 8 and len(sizes) == 30
    ref = engine.pipeline.generate(late.request)
    assert (late.outcome.result.latent - ref.latent).abs().max().item() <= 1e-4


def test_cancelling_one_job_stops_it_within_a_step_and_not_the_others(engine):
    progress: dict[str, list[int]] = {"a": [], "b": []}
    a = job(engine, RED, CacheMode.OFF, steps=40,
            on_progress=lambda k, n, t: progress["a"].append(k))
    b = job(engine, BLUE, CacheMode.OFF, seed=1, steps=40, client=1,
            on_progress=lambda k, n, t: progress["b"].append(k))

    async def cancel_a(pool, jobs):
        while a.steps_done < 3:
            await trio.sleep(0.001)
        cancelled_at = a.steps_done
        a.cancel("client")
        await b.done.wait()
        assert max(progress["a"]) <= cancelled_at + 2  # at most the step in flight

    pool = run_pool(engine, [a, b], max_batch=2, during=cancel_a)
    assert a.state is JobState.CANCELLED and a.cancel_reason == "client"
    assert b.state is JobState.DONE and progress["b"] == list(range(1, 41))
    assert pool.counts["cancelled"] == 1 and pool.counts[Outcome.OFF] == 1
    assert not pool.workers[0].active


def test_jobs_that_cannot_share_a_call_take_turns(engine):
    # another latent shape cannot share the model call: the two groups alternate
    small = Job(engine.resolve(RED, steps=6, width=48), CacheMode.OFF, client=(0, 0))
    big = job(engine, BLUE, CacheMode.OFF, steps=6, client=1)
    pool = run_pool(engine, [small, big], max_batch=4)
    assert pool.workers[0].steps_seen == [1] * 12
    assert small.state is big.state is JobState.DONE
    ref = engine.pipeline.generate(small.request)
    assert torch.equal(small.outcome.result.latent, ref.latent)


def test_a_failing_job_fails_alone(engine):
    bad = job(engine, RED, CacheMode.OFF, steps=5)
    good = job(engine, BLUE, CacheMode.OFF, seed=1, steps=5, client=1)
    start = engine.pipeline.start

    def start_or_fail(request):
        if request.prompt == RED:
            raise RuntimeError("the device is out of memory")
        return start(request)

    engine.pipeline.start = start_or_fail
    try:
        pool = run_pool(engine, [bad, good], max_batch=2)
    finally:
        del engine.pipeline.start
    assert bad.state is JobState.FAILED and "out of memory" in str(bad.error)
    assert good.state is JobState.DONE
    assert pool.counts["failed"] == 1


@pytest.mark.parametrize("max_batch", [1, 4])
def test_jobs_time_the_repeat_probe_and_the_lookup_apart(engine, max_batch):
    # a miss looks up; the same request after it is a repeat, which skips the lookup; an
    # "off" job makes none
    first = job(engine, RED, seed=4)
    run_pool(engine, [first], max_batch)
    again, off = job(engine, RED, seed=4), job(engine, BLUE, CacheMode.OFF, steps=3)
    run_pool(engine, [again, off], max_batch)
    assert (first.outcome.outcome, again.outcome.outcome) == (Outcome.MISS, Outcome.REPEAT)
    assert first.lookup_ms > 0 and first.repeat_ms > 0
    assert again.lookup_ms == 0 and again.repeat_ms > 0
    assert off.lookup_ms == 0
    timings: dict[str, float] = {}
    engine.look_up(engine.resolve(GREEN), CacheMode.REFRESH, timings)
    assert timings["repeat_ms"] >= 0 and "lookup_ms" not in timings
