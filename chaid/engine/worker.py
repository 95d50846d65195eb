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

Batching (``server.max_batch`` > 1): the worker then runs a scheduler loop instead, one
denoising step at a time. Before each step it admits queued jobs, in the queue's turn
order, while it holds fewer than ``max_batch`` (a job joins the jobs in flight at their
current steps: it is looked up, planned and started, then stepped with them); it then runs
the next step of every job that can share a model call with the longest-waiting one
(:attr:`chaid.engine.pipeline.Run.batch_key`: one latent shape, size, fps and guidance),
each at its own timestep and with its own Cache Attention (a hit's rows attend to its
entry's latents at its cache steps), and finishes the jobs that are done (decode, cache
write). Groups that cannot share a call take turns. What a
job gets does not depend on what it ran beside (tests/engine/test_pipeline.py, to 1e-4).
Whether batching pays is a property of the device: :data:`BATCH_BY_DEVICE` holds the
measured choice that ``max_batch = 0`` takes.

Cancellation: :meth:`Job.cancel` finishes a queued job at once; a running job's cancel
scope is cancelled, and ``trio.from_thread.check_cancelled()`` raises at the next check:
the step hook before every denoising step and the models' interruption points
(:mod:`chaid.interrupt`) between DiT blocks and VAE decode stages, so the job stops within
one block. In a batching worker a cancelled job leaves the batch before the next step, so
it stops within one step and the others go on. A cache write that has begun is shielded:
it commits whole or not at all.
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
from chaid.engine.chai import ChaiEngine, ChaiOutcome, Planned
from chaid.engine.pipeline import GenerationRequest, Run
from chaid.engine.scheduler import FairQueue
from chaid.errors import InputError
from chaid.modes import CacheMode, Outcome, decide, steps_for
from chaid.store.matching import LookupResult

log = logging.getLogger(__name__)


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


ProgressCallback = Callable[[int, int, float], None]

# The batch a worker runs when ``server.max_batch`` is 0, by device kind, as measured
# (docs/results.md, "Many clients"): tiny-shapes on one CPU thread ran a batch of B jobs at
# 0.8-1.2 times the speed of B jobs one after another, within the CPU's noise, so a CPU
# runs one job at a time. No GPU curve has been measured (`make gpu-check` prints one);
# until one shows a gain, a GPU runs one job at a time too.
BATCH_BY_DEVICE = {"cpu": 1, "cuda": 1}


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
    # The exact-repeat probe and the cache lookup before the run (ChaiEngine.look_up).
    repeat_ms: float = 0.0
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
                 lookup_limiter: trio.CapacityLimiter, max_batch: int = 0) -> None:
        if not engines:
            raise ValueError("a pool needs at least one engine")
        self.queue_size = queue_size
        self.queue: FairQueue[Job] = FairQueue(queue_size)
        # Finished jobs by outcome, and those cancelled or failed, over all workers.
        self.counts: dict[str, int] = {**{o: 0 for o in Outcome}, "cancelled": 0, "failed": 0}
        self.workers = [DeviceWorker(i, engine, self.queue, lookup_limiter, self.counts,
                                     max_batch)
                        for i, engine in enumerate(engines)]

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def running(self) -> list[Job]:
        return [job for w in self.workers for job in w.active]

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


@dataclass(eq=False)
class _Slot:
    """A job in a batching worker's flight: its plan and its run."""

    job: Job
    planned: Planned
    run: Run


class DeviceWorker:
    """Runs jobs on its engine's device, one at a time or batched; see the module
    docstring."""

    def __init__(self, index: int, engine: ChaiEngine, queue: FairQueue[Job],
                 lookup_limiter: trio.CapacityLimiter, counts: dict[str, int],
                 max_batch: int = 0) -> None:
        self.index = index
        self.engine = engine
        self.queue = queue
        self.lookup_limiter = lookup_limiter
        # One token: exactly one thread drives this worker's model at a time.
        self.device_limiter = trio.CapacityLimiter(1)
        self.max_batch = max_batch or BATCH_BY_DEVICE.get(engine.pipeline.device.type, 1)
        # The jobs this worker is running (at most max_batch).
        self.active: list[Job] = []
        self.completed = 0
        self.counts = counts

    @property
    def device(self) -> str:
        return str(self.engine.pipeline.device)

    @property
    def running(self) -> Job | None:
        """The longest-running of the active jobs (None when idle)."""
        return self.active[0] if self.active else None

    async def run(self) -> None:
        """Take jobs, clients in turn, until the queue is closed and drained."""
        if self.max_batch > 1:
            await self._run_batched()
            return
        while (job := await self.queue.get()) is not None:
            if not job.done.is_set():  # else cancelled while queued
                await self._execute(job)

    # -- one job at a time ------------------------------------------------------------------

    async def _execute(self, job: Job) -> None:
        self._start(job)
        try:
            with job.scope:
                await self._conclude(job, await self._generate(job))
        except Exception as exc:  # reported to the client; the worker keeps serving
            self._fail(job, exc)
        finally:
            self._cancelled_unless_done(job)

    async def _generate(self, job: Job) -> ChaiOutcome:
        lookup, repeat = await self._look_up(job)
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

    # -- batched ----------------------------------------------------------------------------

    async def _run_batched(self) -> None:
        slots: list[_Slot] = []
        closed = False
        try:
            while True:
                # Admit: wait for a job when none is in flight, else take the queued ones.
                while not closed and len(slots) < self.max_batch:
                    if slots:
                        try:
                            job = self.queue.get_nowait()
                        except trio.WouldBlock:
                            break
                    elif (job := await self.queue.get()) is None:
                        closed = True
                        break
                    if not job.done.is_set():  # else cancelled while queued
                        slot = await self._admit(job)
                        if slot is not None:
                            slots.append(slot)
                for slot in [s for s in slots if s.job.cancel_reason is not None]:
                    slots.remove(slot)
                    self._cancelled_unless_done(slot.job)
                if not slots:
                    if closed:
                        return
                    continue
                group = self._next_group(slots)
                await self._step(group, slots)
        finally:
            for slot in slots:  # the worker is torn down mid-flight
                self._cancelled_unless_done(slot.job)

    async def _admit(self, job: Job) -> _Slot | None:
        """Look a job up, plan it and start its run; None when it finished already (an
        exact repeat, an error, a cancellation)."""
        self._start(job)
        slot = None
        try:
            with job.scope:
                lookup, repeat = await self._look_up(job)
                if repeat is not None:
                    outcome = await trio.to_thread.run_sync(
                        self.engine.replay, job.request, repeat, limiter=self.device_limiter)
                    await self._conclude(job, outcome)
                else:
                    planned = await trio.to_thread.run_sync(self.engine.plan, job.request,
                                                            job.mode, lookup,
                                                            limiter=self.lookup_limiter)
                    run = await trio.to_thread.run_sync(self.engine.pipeline.start,
                                                        planned.run,
                                                        limiter=self.device_limiter)
                    slot = _Slot(job, planned, run)
        except Exception as exc:
            self._fail(job, exc)
        finally:
            if slot is None:  # finished, failed, or cancelled while admitted
                self._cancelled_unless_done(job)
        return slot

    def _next_group(self, slots: list[_Slot]) -> list[_Slot]:
        """The longest-waiting slot and every other that can share its model call; the
        group goes to the back of the turns, so groups that cannot share take turns."""
        lead = slots[0]
        group = [lead] + [s for s in slots[1:] if lead.run.batches_with(s.run)]
        for slot in group:
            slots.remove(slot)
        slots.extend(group)
        return group

    async def _step(self, group: list[_Slot], slots: list[_Slot]) -> None:
        for slot in group:
            slot.job._report(slot.run.step_number, slot.run.request.steps, slot.run.t)
        try:
            await trio.to_thread.run_sync(self.engine.pipeline.step, [s.run for s in group],
                                          limiter=self.device_limiter)
        except Exception as exc:  # the device failed the call: every job in it fails
            for slot in group:
                slots.remove(slot)
                self._fail(slot.job, exc)
            return
        for slot in [s for s in group if s.run.done]:
            slots.remove(slot)
            job = slot.job
            if job.cancel_reason is not None:
                self._cancelled_unless_done(job)
                continue
            try:
                result = await trio.to_thread.run_sync(self.engine.pipeline.finish, slot.run,
                                                       limiter=self.device_limiter)
                await self._conclude(job, self.engine.complete(slot.planned, result))
            except Exception as exc:
                self._fail(job, exc)

    # -- shared by both ---------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        job.state = JobState.RUNNING
        job.started_at = time.perf_counter()
        if job not in self.active:
            self.active.append(job)

    async def _look_up(self, job: Job) -> tuple[LookupResult | None, Any]:
        """The job's exact repeat, else its cache lookup when its mode needs one."""
        timings: dict[str, float] = {}
        lookup, repeat = await trio.to_thread.run_sync(self.engine.look_up, job.request,
                                                       job.mode, timings,
                                                       limiter=self.lookup_limiter)
        job.repeat_ms = timings.get("repeat_ms", 0.0)
        job.lookup_ms = timings.get("lookup_ms", 0.0)
        return lookup, repeat

    async def _conclude(self, job: Job, outcome: ChaiOutcome) -> None:
        """A finished run: a miss's latents written, the job done."""
        if outcome.outcome.writes_cache:
            # Shielded: a cancellation arriving now must not lose a finished run's latents,
            # and the write is atomic anyway.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.engine.insert, outcome, job.owner_uid,
                                              limiter=self.lookup_limiter)
        job.outcome = outcome
        self.completed += 1
        self.counts[outcome.outcome] += 1
        self._leave(job, JobState.DONE)

    def _fail(self, job: Job, exc: BaseException) -> None:
        """A job that raised: the error is reported to its client; the worker goes on."""
        if job.done.is_set():
            return
        job.error = exc
        self.counts["failed"] += 1
        self._leave(job, JobState.FAILED)
        if not isinstance(exc, InputError):
            log.error("job %r failed", job.request.prompt[:80], exc_info=exc)

    def _cancelled_unless_done(self, job: Job) -> None:
        """A job stopped by its own cancellation, or by the worker being torn down."""
        if job.done.is_set():
            if job in self.active:
                self.active.remove(job)
            return
        if job.cancel_reason is None:
            job.cancel_reason = "shutdown"
        self.counts["cancelled"] += 1
        self._leave(job, JobState.CANCELLED)

    def _leave(self, job: Job, state: JobState) -> None:
        if job in self.active:
            self.active.remove(job)
        job._finish(state)
