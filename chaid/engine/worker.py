"""The device workers: one per device (or several sharing a CPU's cores), all taking
generation jobs from one bounded, fair queue (:mod:`chaid.engine.scheduler`: clients take
turns). A worker that becomes free takes the next job in turn, so a job never waits behind
a busy device while another is idle. Every worker has its own model replica; all share
one store, so a miss written by one worker is a hit for the next lookup of any.

A :class:`Job` is the per-request object: its resolved request, cache mode, state, progress
callback and outcome live here, never on the shared engine. The worker runs one job at a
time: the lookup on the lookup limiter (CPU threads shared with ``cache.lookup`` calls, so
lookups never wait behind the device), the generation on the device limiter (one thread),
then the cache write. The lookup happens when the job reaches the device, not when it is
queued, so a queued prompt can hit the entry that the miss before it just wrote.

Cancellation: :meth:`Job.cancel` finishes a queued job at once; a running job's cancel
scope is cancelled, and ``trio.from_thread.check_cancelled()`` raises at the next check:
the step hook before every denoising step and the models' interruption points
(:mod:`chaid.interrupt`) between DiT blocks and VAE decode stages, so the job stops within
one block. A cache write
that has begun is shielded: it commits whole or not at all.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from chaid import interrupt
from chaid.engine.chai import ChaiEngine, ChaiOutcome
from chaid.engine.pipeline import GenerationRequest
from chaid.engine.scheduler import FairQueue
from chaid.errors import InputError
from chaid.modes import CacheMode, Outcome, decide, needs_lookup, steps_for
from chaid.store.matching import LookupResult

log = logging.getLogger(__name__)


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


ProgressCallback = Callable[[int, int, float], None]


@dataclass(eq=False)
class Job:
    """One generation request on its way through the worker."""

    request: GenerationRequest  # resolved
    mode: CacheMode
    # Called in the trio thread before each denoising step: (step, steps, t).
    on_progress: ProgressCallback | None = None
    # Who asked (the peer's uid): a miss's entry records it as its owner.
    owner_uid: int | None = None
    # (user, connection) for the fair queue's turns, and the job's priority among its
    # client's own jobs (higher first).
    client: tuple = (None, 0)
    priority: int = 0
    state: JobState = JobState.QUEUED
    outcome: ChaiOutcome | None = None
    error: BaseException | None = None
    # Why it was cancelled: "client", "disconnect", "deadline" or "shutdown".
    cancel_reason: str | None = None
    steps_total: int = 0
    steps_done: int = 0
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    finished_at: float | None = None
    lookup_ms: float = 0.0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)

    def cancel(self, reason: str) -> None:
        """Stop the job: at once if queued, at the next denoising step if running."""
        if self.done.is_set() or self.cancel_reason is not None:
            return
        self.cancel_reason = reason
        self.scope.cancel()
        if self.state is JobState.QUEUED:
            self._finish(JobState.CANCELLED)

    def _finish(self, state: JobState) -> None:
        self.state = state
        self.finished_at = time.perf_counter()
        self.done.set()

    def _report(self, step: int, steps: int, t: float) -> None:
        self.steps_total = steps
        self.steps_done = step - 1
        if self.on_progress is not None:
            self.on_progress(step, steps, t)


class WorkerPool:
    """The fair queue and the device workers that drain it."""

    def __init__(self, engines: list[ChaiEngine], queue_size: int,
                 lookup_limiter: trio.CapacityLimiter) -> None:
        if not engines:
            raise ValueError("a pool needs at least one engine")
        self.queue_size = queue_size
        self.queue: FairQueue[Job] = FairQueue(queue_size)
        # Finished jobs by outcome, and those cancelled or failed, over all workers.
        self.counts: dict[str, int] = {**{o: 0 for o in Outcome}, "cancelled": 0, "failed": 0}
        self.workers = [DeviceWorker(i, engine, self.queue, lookup_limiter, self.counts)
                        for i, engine in enumerate(engines)]

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def running(self) -> list[Job]:
        return [w.running for w in self.workers if w.running is not None]

    def submit(self, job: Job) -> None:
        """Queue a job without waiting; QueueFull when queue_size jobs already wait."""
        self.queue.put_nowait(job)

    def close(self) -> None:
        """Accept no more jobs; :meth:`run` returns once the queued ones are done."""
        self.queue.close()

    async def run(self) -> None:
        """Run every worker until the queue is closed and drained."""
        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                nursery.start_soon(worker.run)


class DeviceWorker:
    """Runs jobs one at a time on its engine's device; see the module docstring."""

    def __init__(self, index: int, engine: ChaiEngine, queue: FairQueue[Job],
                 lookup_limiter: trio.CapacityLimiter, counts: dict[str, int]) -> None:
        self.index = index
        self.engine = engine
        self.queue = queue
        self.lookup_limiter = lookup_limiter
        # One token: exactly one thread drives this worker's model at a time.
        self.device_limiter = trio.CapacityLimiter(1)
        self.running: Job | None = None
        self.completed = 0
        self.counts = counts

    @property
    def device(self) -> str:
        return str(self.engine.pipeline.device)

    async def run(self) -> None:
        """Take jobs, clients in turn, until the queue is closed and drained."""
        while (job := await self.queue.get()) is not None:
            if job.done.is_set():  # cancelled while queued
                continue
            self.running = job
            try:
                await self._execute(job)
            finally:
                self.running = None

    async def _execute(self, job: Job) -> None:
        job.state = JobState.RUNNING
        job.started_at = time.perf_counter()
        try:
            with job.scope:
                outcome = await self._generate(job)
                if outcome.outcome.writes_cache:
                    # Shielded: a cancellation arriving now must not lose a finished run's
                    # latents, and the write is atomic anyway.
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(self.engine.insert, outcome,
                                                      job.owner_uid,
                                                      limiter=self.lookup_limiter)
                job.outcome = outcome
        except Exception as exc:  # reported to the client; the worker keeps serving
            job.error = exc
            self.counts["failed"] += 1
            job._finish(JobState.FAILED)
            if not isinstance(exc, InputError):
                log.exception("job %r failed", job.request.prompt[:80])
            return
        finally:
            if not job.done.is_set() and job.outcome is None and job.error is None:
                # Cancelled by its own scope, or the worker itself is being torn down.
                if job.cancel_reason is None:
                    job.cancel_reason = "shutdown"
                self.counts["cancelled"] += 1
                job._finish(JobState.CANCELLED)
        if not job.done.is_set():
            self.completed += 1
            self.counts[job.outcome.outcome] += 1
            job._finish(JobState.DONE)

    async def _generate(self, job: Job) -> ChaiOutcome:
        lookup: LookupResult | None = None
        repeat = await trio.to_thread.run_sync(self.engine.find_repeat, job.request, job.mode,
                                               limiter=self.lookup_limiter)
        if repeat is None and needs_lookup(job.mode):
            t0 = time.perf_counter()
            lookup = await trio.to_thread.run_sync(self.engine.lookup_or_miss, job.request,
                                                   limiter=self.lookup_limiter)
            job.lookup_ms = (time.perf_counter() - t0) * 1e3
        # The steps the run is expected to take, for progress reports. A hit whose entry is
        # evicted between lookup and read runs full instead: only its progress total is off.
        expected = (Outcome.REPEAT.run if repeat is not None else
                    decide(job.mode, lookup is not None and lookup.hit).run)
        steps = steps_for(expected, self.engine.pipeline.chai, job.request.steps)

        def on_step(step: int, t: float, z: Any) -> None:
            # Runs in the worker thread before each denoising step.
            trio.from_thread.check_cancelled()
            trio.from_thread.run_sync(job._report, step, steps, t)

        def generate() -> ChaiOutcome:
            # Runs in the worker thread: the models' interruption points poll the job's
            # cancel scope too, so a long step stops within one block.
            with interrupt.checking(trio.from_thread.check_cancelled):
                return self.engine.generate(job.request, job.mode, lookup, on_step, repeat)

        return await trio.to_thread.run_sync(generate, limiter=self.device_limiter)

