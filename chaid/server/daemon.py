"""The daemon's lifecycle and its method handlers.

Start: settings → store (consistency check and index rebuild happen as it opens) → models
→ listeners (adopted from systemd or bound) → ``READY=1``. Serve: one accept loop per
listener, one :class:`~chaid.server.connection.Connection` per client, one device worker
per device, each running one job at a time or a batch (chaid/engine/worker.py;
`server.devices`, `server.cpu_workers`, `server.max_batch`).
Stop (SIGTERM or SIGINT): ``STOPPING=1``, close the listeners, answer new requests with
``shutting_down``, give in-flight requests ``server.grace_period_s`` to finish and their
answers to be sent, cancel the rest (each gets a ``shutting_down`` error), close
connections, flush and close the store, exit 0. A second signal skips what is left of the
grace period.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from typing import Any

import trio

from chaid import __version__
from chaid.config import Settings
from chaid.engine.chai import ChaiEngine, lookup_as_dict
from chaid.engine.cost import Admission, CostModel, TooCostly
from chaid.engine.scheduler import QueueFull
from chaid.engine.worker import Job, JobState, WorkerPool
from chaid.errors import ChaidError, InputError
from chaid.modes import CacheMode, Outcome, decide, steps_for
from chaid.protocol import METHODS, PROTOCOL_VERSION, ErrorCode, Request, RpcError, response
from chaid.server.connection import Connection, Services
from chaid.server.listeners import (
    BoundSocket,
    bind_socket,
    check_socket_path,
    inherited_sockets,
    release,
    socket_activated,
)
from chaid.server.logs import fields
from chaid.server.peercred import AccessPolicy, PeerCredentials, RateLimiter, peer_credentials
from chaid.server.sdnotify import Notifier, extend_start_while
from chaid.server.stats import ServerStats
from chaid.store.errors import StoreError

log = logging.getLogger("chaid.server")

# How often shutdown checks whether in-flight requests have all been answered.
_DRAIN_POLL_S = 0.05
# After the grace period, cancelled generations stop within one denoising step; a step of
# the largest model takes seconds, so wait this long for their error responses.
_CANCEL_WAIT_S = 30.0
# Accept errors such as EMFILE are transient: pause before retrying instead of spinning.
_ACCEPT_RETRY_S = 0.1
_ACCEPT_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS,
                     errno.ECONNABORTED}
# A refused connection gets its error frame within this long or is closed without it.
_REFUSAL_SEND_S = 1.0

# Error code for a job cancelled for each reason.
_CANCEL_CODES = {
    "client": (ErrorCode.CANCELLED, "cancelled by the client"),
    "disconnect": (ErrorCode.CANCELLED, "cancelled: the client disconnected"),
    "deadline": (ErrorCode.DEADLINE_EXCEEDED, "the request's deadline passed"),
    "shutdown": (ErrorCode.SHUTTING_DOWN, "cancelled: the daemon is shutting down"),
}


# A request whose cheapest run is estimated at more than this many times its deadline is
# refused at admission (estimates are within tens of percent; closer calls are run and
# stopped at the deadline).
DEADLINE_SLACK = 1.5


class Daemon:
    """The serving state shared by every connection: engine, worker, limits, counters."""

    def __init__(self, settings: Settings, engines: list[ChaiEngine], access: AccessPolicy,
                 notifier: Notifier, cost: CostModel) -> None:
        srv = settings.server
        self.settings = settings
        # The first worker's engine: the store, the fingerprint and the request rules are
        # every worker's.
        self.engine = engines[0]
        self.admission = Admission.from_settings(cost, srv.max_request_s,
                                                 srv.max_request_memory_mb)
        self.access = access
        self.notifier = notifier
        self.lookup_limiter = trio.CapacityLimiter(srv.lookup_threads)
        self.rate = RateLimiter(srv.rate_per_s, srv.rate_burst, trio.current_time)
        self.worker = WorkerPool(engines, srv.queue_size, self.lookup_limiter, srv.max_batch)
        self.connections: set[Connection] = set()
        # Open connections by peer uid (entries removed at zero), for the per-user cap.
        self.user_connections: dict[int, int] = {}
        self.draining = False
        self.stats = ServerStats(frozenset(METHODS))
        handlers = {
            "ping": self.ping,
            "generate": self.generate,
            "cancel": self.cancel,
            "stats": self.stats_handler,
            "cache.lookup": self.cache_lookup,
            "cache.list": self.cache_list,
            "cache.evict": self.cache_evict,
            "cache.clear": self.cache_clear,
            "cache.warm": self.cache_warm,
        }
        self.services = Services(srv, srv.limits, access, self.rate, self.stats, handlers)

    # -- serving ------------------------------------------------------------------------------

    async def accept_loop(self, bound: BoundSocket, nursery: trio.Nursery) -> None:
        """Accept connections on one listener until cancelled."""
        listener = trio.SocketListener(bound.sock)
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_TRANSIENT:
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(_ACCEPT_RETRY_S)
                    continue
                raise
            nursery.start_soon(self._serve_connection, stream)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = peer_credentials(stream.socket)
        except OSError as exc:
            log.warning("cannot read peer credentials: %s", exc)
            await trio.aclose_forcefully(stream)
            return
        number = self.stats.count_connection()
        refusal = self._admission(peer)
        if refusal is not None:
            await self._refuse(stream, peer, refusal, number)
            return
        conn = Connection(self.services, stream, peer, number)
        # Checked and counted with no await in between: concurrent accepts cannot overshoot.
        self.connections.add(conn)
        self.user_connections[peer.uid] = self.user_connections.get(peer.uid, 0) + 1
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            left = self.user_connections.pop(peer.uid) - 1
            if left:
                self.user_connections[peer.uid] = left

    def _admission(self, peer: PeerCredentials) -> RpcError | None:
        """Why a new connection of ``peer`` is refused, or None to serve it.

        Access comes first, then the user's share, so a user at its cap learns that retrying
        will not help until it closes connections of its own.
        """
        srv = self.settings.server
        if not self.access.allows(peer):
            # At accept, not at the first frame: a refused peer holds no slot meanwhile.
            return RpcError(ErrorCode.FORBIDDEN,
                            f"uid {peer.uid} is not allowed to use this daemon")
        held = self.user_connections.get(peer.uid, 0)
        if held >= srv.max_connections_per_user and not self.access.privileged(peer):
            return RpcError(ErrorCode.TOO_MANY_CONNECTIONS,
                            f"uid {peer.uid} already has {held} connections open; the limit "
                            f"per user is {srv.max_connections_per_user}",
                            {"max_connections_per_user": srv.max_connections_per_user})
        if len(self.connections) >= srv.max_connections:
            return RpcError(ErrorCode.BUSY,
                            f"too many connections ({srv.max_connections}); retry later",
                            {"max_connections": srv.max_connections})
        return None

    async def _refuse(self, stream: trio.SocketStream, peer: PeerCredentials,
                      error: RpcError, number: int) -> None:
        """Answer a refused connection with one nil-id error frame, then close it."""
        self.stats.count_error(error.code)
        log.warning("connection refused: %s", error.code, extra=fields(
            conn=number, uid=peer.uid, pid=peer.pid,
            connections=len(self.connections)))
        # The frame is small and the socket buffer empty: this only waits on a broken peer.
        with trio.move_on_after(_REFUSAL_SEND_S):
            try:
                await stream.send_all(response(None, error))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(stream)

    def update_status(self) -> None:
        c = self.worker.counts
        self.notifier.status(
            f"serving: {len(self.engine.store)} cached entries; {c[Outcome.HIT]} hits, "
            f"{c[Outcome.MISS]} misses, {c[Outcome.OFF]} uncached; {self.worker.queued} queued")

    # -- handlers -----------------------------------------------------------------------------

    async def ping(self, conn: Connection, req: Request, p: dict[str, Any]) -> Any:
        return {"pong": True, "version": __version__, "protocol": PROTOCOL_VERSION}

    async def cancel(self, conn: Connection, req: Request, p: dict[str, Any]) -> Any:
        job = conn.jobs.get(p["request_id"])
        if job is None:
            raise RpcError(ErrorCode.NOT_FOUND,
                           f"no generation with request id {p['request_id']} in flight on "
                           f"this connection")
        state = job.state.value
        job.cancel("client")
        return {"cancelled": True, "state": state}

    def _resolve(self, p: dict[str, Any]):
        try:
            return self.engine.resolve(
                p["prompt"], frames=p.get("frames"), height=p.get("height"),
                width=p.get("width"), seed=p.get("seed", 0), cfg_scale=p.get("cfg_scale"),
                steps=p.get("steps"))
        except InputError as exc:
            raise RpcError(ErrorCode.INVALID_PARAMS, str(exc)) from None

    def _check_deadline(self, request, mode: CacheMode, deadline_s: float) -> None:
        """Refuse at once a request that cannot finish by its deadline: even its cheapest
        run (a hit's, for auto) is estimated to take more than DEADLINE_SLACK times the
        deadline on this device, with nothing queued ahead."""
        cheapest = steps_for(decide(mode, True).run, self.engine.pipeline.chai, request.steps)
        seconds = self.admission.cost.estimate(request, cheapest).seconds
        if seconds is not None and seconds > DEADLINE_SLACK * deadline_s:
            raise RpcError(ErrorCode.DEADLINE_EXCEEDED,
                           f"{request.frames} frames of {request.width}x{request.height} take "
                           f"about {seconds:.1f} s on this device even as a cache hit, more "
                           f"than the deadline of {deadline_s:g} s allows; nothing was run",
                           {"estimated_s": round(seconds, 2), "deadline_s": deadline_s,
                            "steps_done": 0, "steps": cheapest})

    async def _run_job(self, conn: Connection, req: Request, p: dict[str, Any],
                       mode: CacheMode) -> Job:
        """Queue a job and wait for it; RpcError for busy, cancelled, failed."""
        if self.draining:
            raise RpcError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
        request = self._resolve(p)
        # Before any work: the costliest run this request may take (a miss for auto).
        steps = steps_for(decide(mode, False).run, self.engine.pipeline.chai, request.steps)
        try:
            self.admission.check(request, steps)
        except TooCostly as exc:
            raise RpcError(ErrorCode.TOO_LARGE, str(exc), exc.data) from None
        if p.get("deadline_s"):
            self._check_deadline(request, mode, p["deadline_s"])
        deadline_s = p.get("deadline_s") or self.settings.server.request_timeout_s
        deadline = trio.current_time() + deadline_s
        on_progress = None
        if p.get("progress"):
            def on_progress(step: int, steps: int, t: float) -> None:
                conn.notify("progress", {"request_id": req.id, "step": step, "steps": steps,
                                         "t": round(t, 3)})
        job = Job(request, mode, on_progress, owner_uid=conn.peer.uid,
                  client=(conn.peer.uid, conn.number), priority=p.get("priority", 0))
        try:
            self.worker.submit(job)
        except QueueFull:
            raise RpcError(ErrorCode.BUSY, f"the device queue is full ({self.worker.queue_size}"
                           f" waiting); retry later",
                           {"queued": self.worker.queue_size}) from None
        conn.jobs[req.id] = job
        try:
            with trio.move_on_at(deadline):
                await job.done.wait()
            if not job.done.is_set():
                job.cancel("deadline")
                await job.done.wait()
        finally:
            conn.jobs.pop(req.id, None)
            if not job.done.is_set():
                job.cancel("disconnect")
        self.update_status()
        if job.state is JobState.CANCELLED:
            code, message = _CANCEL_CODES.get(job.cancel_reason or "shutdown",
                                              _CANCEL_CODES["shutdown"])
            raise RpcError(code, message, {"steps_done": job.steps_done,
                                           "steps": job.steps_total})
        if job.state is JobState.FAILED:
            exc = job.error
            if isinstance(exc, InputError):
                raise RpcError(ErrorCode.INVALID_PARAMS, str(exc))
            if isinstance(exc, StoreError):
                raise RpcError(ErrorCode.STORE_ERROR, str(exc))
            raise RpcError(ErrorCode.INTERNAL, "generation failed; see the daemon's log")
        return job

    async def generate(self, conn: Connection, req: Request, p: dict[str, Any]) -> Any:
        t0 = time.perf_counter()
        job = await self._run_job(conn, req, p, CacheMode(p["cache"]))
        outcome = job.outcome
        result = outcome.result
        t_video = time.perf_counter()
        if p["format"] == "mp4":
            from chaid.video import encode_mp4

            video: Any = await trio.to_thread.run_sync(encode_mp4, result.video, result.fps)
        else:
            video = result.video
        t_end = time.perf_counter()
        timings = {
            "queue_ms": (job.started_at - job.enqueued_at) * 1e3,
            "repeat_ms": job.repeat_ms,
            "lookup_ms": job.lookup_ms,
            **{k: v for k, v in result.timings.as_dict().items() if k != "total_ms"},
            "generate_ms": result.timings.total_ms,
            **outcome.timings_ms,
            "video_ms": (t_end - t_video) * 1e3,
            "total_ms": (t_end - t0) * 1e3,
        }
        inserted = outcome.inserted
        log.info("generated", extra=fields(
            conn=conn.number, id=req.id, cache=outcome.outcome.value, steps=result.steps,
            entry=(outcome.lookup.entry_id if outcome.outcome is Outcome.HIT else
                   inserted.entry_id if inserted else None),
            total_ms=round(timings["total_ms"], 1)))
        return {
            "video": video,
            "format": p["format"],
            "cache": outcome.outcome.value,
            "mode": result.run.value,
            "steps": result.steps,
            "frames": int(result.video.shape[0]),
            "height": int(result.video.shape[1]),
            "width": int(result.video.shape[2]),
            "fps": result.fps,
            "seed": outcome.request.seed,
            "prompt": outcome.request.prompt,
            "entities": list(outcome.lookup.entities) if outcome.lookup else None,
            "matched": await self._redacted_match(conn, outcome.matched()),
            "inserted": None if inserted is None else {
                "entry_id": inserted.entry_id, "bytes": inserted.bytes,
                "evicted": inserted.evicted},
            "not_cached": outcome.not_cached,
            "understood": None if outcome.understood is None else outcome.understood.as_dict(),
            "timings": {k: round(float(v), 2) for k, v in timings.items()},
        }

    async def cache_warm(self, conn: Connection, req: Request, p: dict[str, Any]) -> Any:
        job = await self._run_job(conn, req, {**p, "progress": False}, CacheMode.REFRESH)
        inserted = job.outcome.inserted
        return {
            "entry_id": inserted.entry_id if inserted else None,
            "steps": job.outcome.result.steps,
            "timings": {"total_ms": round((job.finished_at - job.enqueued_at) * 1e3, 2)},
        }

    async def stats_handler(self, conn: Connection, req: Request, p: dict[str, Any]) -> Any:
        cache_stats = await trio.to_thread.run_sync(self.engine.store.stats,
                                                    limiter=self.lookup_limiter)
        return {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "uptime_s": round(self.stats.uptime_s(), 1),
            "model": self.engine.pipeline.parts.spec.name,
            "device": str(self.engine.pipeline.device),
            "fingerprint": self.engine.fingerprint,
            # what a hit runs: its steps, and whether they attend to the entry's latents
            "hit": {"steps": self.engine.pipeline.chai.fast_steps,
                    "cache_attention": self.engine.pipeline.hit_attends},
            "queue": {"size": self.worker.queue_size, "queued": self.worker.queued,
                      "clients": self._queue_depths(conn),
                      "running": _progress(next(iter(self.worker.running), None))},
            "workers": [{"index": w.index, "device": w.device, "max_batch": w.max_batch,
                         "running": _progress(w.running),
                         "batch": [_progress(job) for job in w.active]}
                        for w in self.worker.workers],
            "generations": {str(k): v for k, v in self.worker.counts.items()},
            "admission": self.admission.as_dict(),
            "connections": len(self.connections),
            "requests": dict(self.stats.requests),
            "errors": dict(self.stats.errors),
            "cache": {**cache_stats,
                      "write_failures": sum(w.engine.store_write_failures
                                            for w in self.worker.workers)},
            "shared": None if self.engine.shared is None else self.engine.shared.stats(),
            "repeats": None if self.engine.repeats is None else self.engine.repeats.stats(),
            "peer": {"uid": conn.peer.uid, "gid": conn.peer.gid, "admin": conn.admin},
        }

    def _queue_depths(self, conn: Connection) -> list[dict[str, Any]]:
        """Queued jobs per client ({uid, connection, queued}) in the order they take turns;
        with private prompts, a non-admin sees only its own uid's."""
        depths = [{"uid": d["user"], "connection": d["connection"], "queued": d["queued"]}
                  for d in self.worker.queue.depths()]
        if self._private_for(conn):
            depths = [d for d in depths if d["uid"] == conn.peer.uid]
        return depths

    async def cache_lookup(self, conn: Connection, req: Request, p: dict[str, Any]) -> Any:
        request = self._resolve({**p, "seed": 0, "cfg_scale": None})
        lookup = await trio.to_thread.run_sync(
            lambda: self.engine.lookup(request, touch=False), limiter=self.lookup_limiter)
        out = lookup_as_dict(lookup)
        if lookup.hit and not await self._may_read(conn, lookup.entry_id):
            out["cached_prompt"] = None
            for match in out["matches"]:
                match["cached"] = None
        out["latent_shape"] = list(self.engine.latent_shape(request))
        out["fingerprint"] = self.engine.fingerprint
        understood = self.engine.pipeline.understand(request.prompt)
        out["understood"] = None if understood is None else understood.as_dict()
        return out

    async def cache_list(self, conn: Connection, req: Request, p: dict[str, Any]) -> Any:
        private = self._private_for(conn)

        def read() -> list[dict[str, Any]]:
            records = sorted(self.engine.store.records(), key=lambda r: -r.last_access)
            if private:
                records = [r for r in records if _owner(r) == conn.peer.uid]
            total[0] = len(records)
            if p["limit"]:
                records = records[: p["limit"]]
            return [{"id": r.entry_id, "prompt": r.prompt, "entities": list(r.entities),
                     "hits": r.hits, "bytes": r.bytes, "created": r.created,
                     "last_access": r.last_access, "shape": list(r.shape),
                     "fingerprint": r.fingerprint} for r in records]

        total = [0]
        entries = await trio.to_thread.run_sync(read, limiter=self.lookup_limiter)
        return {"entries": entries, "total": total[0]}

    # -- prompt privacy (server.share_prompts) -----------------------------------------------

    def _private_for(self, conn: Connection) -> bool:
        """Whether ``conn`` may read only its own entries' prompts."""
        return not self.settings.server.share_prompts and not conn.admin

    async def _may_read(self, conn: Connection, entry_id: int | None) -> bool:
        if not self._private_for(conn) or entry_id is None:
            return True

        def owner() -> int | None:
            try:
                return _owner(self.engine.store.get_record(entry_id))
            except StoreError:  # evicted since: nothing to show
                return None

        return await trio.to_thread.run_sync(owner, limiter=self.lookup_limiter) == \
            conn.peer.uid

    async def _redacted_match(self, conn: Connection, matched: dict[str, Any] | None
                              ) -> dict[str, Any] | None:
        """A hit's matched entry, without its prompt and entity texts when ``conn`` may not
        read them."""
        if matched is None or await self._may_read(conn, matched["entry_id"]):
            return matched
        return {**matched, "prompt": None,
                "entities": [{**e, "cached": None} for e in matched["entities"]]}

    async def cache_evict(self, conn: Connection, req: Request, p: dict[str, Any]) -> Any:
        ids = p["entry_ids"]
        removed = await self._store_call(self.engine.store.evict, ids)
        return {"evicted": removed, "missing": sorted(set(ids) - set(removed))}

    async def cache_clear(self, conn: Connection, req: Request, p: dict[str, Any]) -> Any:
        removed = await self._store_call(self.engine.store.clear)
        return {"evicted": len(removed)}

    async def _store_call(self, fn, *args: Any) -> Any:
        # Shielded: a store write commits whole; the client leaving must not abandon it.
        with trio.CancelScope(shield=True):
            try:
                return await trio.to_thread.run_sync(fn, *args, limiter=self.lookup_limiter)
            except StoreError as exc:
                raise RpcError(ErrorCode.STORE_ERROR, str(exc)) from None

    # -- shutdown -----------------------------------------------------------------------------

    def _busy(self) -> bool:
        """Requests in flight, or answers still queued for a client: closing a connection
        drops its queued output, so a finished request's response must leave first."""
        return bool(self.stats.inflight) or any(c.busy() for c in self.connections)

    async def drain(self, force: trio.Event) -> None:
        """Let in-flight requests finish within the grace period, then cancel the rest."""
        self.draining = True
        grace = self.settings.server.grace_period_s
        with trio.move_on_after(grace):
            while self._busy() and not force.is_set():
                await trio.sleep(_DRAIN_POLL_S)
        if self.stats.inflight:
            log.warning("grace period over; cancelling in-flight work",
                        extra=fields(inflight=self.stats.inflight, grace_s=grace))
            for conn in list(self.connections):
                for job in list(conn.jobs.values()):
                    job.cancel("shutdown")
            with trio.move_on_after(_CANCEL_WAIT_S):
                while self._busy():
                    await trio.sleep(_DRAIN_POLL_S)
        self.worker.close()
        for conn in list(self.connections):
            conn.close()


async def _watch_signals(shutdown: trio.Event, force: trio.Event,
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            if shutdown.is_set():
                log.warning("second %s: skipping the grace period",
                            signal.Signals(signum).name)
                force.set()
            else:
                log.info("%s received: shutting down", signal.Signals(signum).name)
                shutdown.set()


async def _watchdog(notifier: Notifier) -> None:
    # Pinging from the event loop itself: a blocked loop stops the pings, and systemd
    # restarts the daemon.
    assert notifier.watchdog_s is not None
    while True:
        notifier.watchdog()
        await trio.sleep(notifier.watchdog_s / 2)


async def serve(settings: Settings) -> int:
    """Run the daemon until SIGTERM/SIGINT; return the exit status (0 after a clean stop)."""
    notifier = Notifier()
    shutdown, force = trio.Event(), trio.Event()
    srv = settings.server
    access = AccessPolicy.from_names(srv.allowed_users, srv.allowed_groups, srv.admin_users,
                                     srv.admin_groups)
    async with trio.open_nursery() as root:
        await root.start(_watch_signals, shutdown, force)
        if notifier.watchdog_s:
            root.start_soon(_watchdog, notifier)
        # 0. a busy socket path is refused now, not after seconds of loading.
        if not socket_activated():
            check_socket_path(srv.socket)
        # 1. store and models (seconds): abandoned if a signal arrives meanwhile.
        notifier.status("loading the store and the model")
        engines: list[ChaiEngine] = []
        cost: CostModel | None = None
        with trio.CancelScope() as loading:
            root.start_soon(_cancel_on, shutdown, loading)
            async with trio.open_nursery() as extending:
                extending.start_soon(extend_start_while, notifier)
                engines = await trio.to_thread.run_sync(ChaiEngine.load_workers, settings,
                                                        abandon_on_cancel=True)
                # What a request costs on a worker's device, for admission (a second or
                # two).
                notifier.status("timing the model on the device")
                cost = CostModel(engines[0].pipeline)
                await trio.to_thread.run_sync(cost.calibrate, abandon_on_cancel=True)
                extending.cancel_scope.cancel()
        if not engines or cost is None or cost.calibration is None:
            log.info("stopped while starting")
            root.cancel_scope.cancel()
            return 0
        try:
            code = await _serve_with(settings, engines, cost, access, notifier, shutdown,
                                     force)
        finally:
            with trio.CancelScope(shield=True):  # the store, which every worker shares
                await trio.to_thread.run_sync(engines[0].close)
            log.info("store closed; exiting")
        root.cancel_scope.cancel()
    return code


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _serve_with(settings: Settings, engines: list[ChaiEngine], cost: CostModel,
                      access: AccessPolicy, notifier: Notifier, shutdown: trio.Event,
                      force: trio.Event) -> int:
    srv = settings.server
    # 2. listeners: systemd's if it passed any, else our own path.
    bound = inherited_sockets()
    if not bound:
        bound = [bind_socket(srv.socket, srv.socket_mode_bits, srv.socket_group)]
    daemon = Daemon(settings, engines, access, notifier, cost)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.worker.run)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as acceptors:
                    for b in bound:
                        acceptors.start_soon(daemon.accept_loop, b, connections)
                    # 3. ready.
                    names = ", ".join(b.name for b in bound)
                    log.info("ready", extra=fields(
                        listen=names, model=settings.model.name,
                        device=", ".join(w.device for w in daemon.worker.workers),
                        entries=len(daemon.engine.store),
                        fingerprint=daemon.engine.fingerprint, pid=os.getpid()))
                    notifier.ready(f"serving on {names}; {len(daemon.engine.store)} cached "
                                   f"entries")
                    await shutdown.wait()
                    # 4. stop accepting, drain, close.
                    notifier.stopping("draining in-flight requests")
                    acceptors.cancel_scope.cancel()
                for b in bound:
                    release(b)
                await daemon.drain(force)
                connections.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    finally:
        for b in bound:
            release(b)
    return 0


def run(settings: Settings) -> int:
    """Entry point of ``chaid serve``: run the trio loop; ChaidError for startup failures."""
    from chaid.engine.pipeline import apply_torch_threads

    threads = apply_torch_threads(settings)
    log.info("torch uses %d threads (server.torch_threads)", threads)
    try:
        return trio.run(serve, settings)
    except* ChaidError as group:
        raise _one_error(group) from None
    except* OSError as group:  # a path or a device the daemon cannot use: one line, too
        for exc in _leaves(group):
            log.debug("start-up failed", exc_info=exc)
        raise _one_error(BaseExceptionGroup("start-up", [
            ChaidError(_os_message(exc)) for exc in _leaves(group)])) from None


def _progress(job: Job | None) -> dict[str, int] | None:
    """A running job's progress for ``stats`` (None when nothing runs)."""
    return None if job is None else {"steps_done": job.steps_done, "steps": job.steps_total}


def _owner(record: Any) -> int | None:
    """The uid whose miss made a cache entry (None: made before owners were recorded)."""
    uid = record.extra.get("owner_uid")
    return uid if isinstance(uid, int) else None


def _os_message(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _one_error(group: BaseExceptionGroup) -> ChaidError:
    """The startup errors of a group as one ChaidError, each of them logged.

    Concurrent start-up tasks can fail together (say, the store and a listener): every one
    is logged, and the user reads all their messages in one line.
    """
    errors = list(_leaves(group))
    for exc in errors:
        log.error("start-up failed: %s", exc)
    if len(errors) == 1:
        return errors[0]
    messages = list(dict.fromkeys(str(exc) for exc in errors))
    return ChaidError("; ".join(messages))


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
