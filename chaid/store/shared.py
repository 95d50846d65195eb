"""The shared tier: several daemons, on one host or many, share their cache entries through
Redis (``[store] shared_url``).

Each daemon's LMDB store stays its first tier. What the shared tier adds:

* **Publishing.** A miss's entry, once committed locally, is written to Redis by a
  background thread: its record and vectors under ``<ns>:e:{<gid>}``, its latents under
  ``<ns>:l:{<gid>}`` (one field per step), then an ``insert`` event is appended to the
  stream ``<ns>:log``. ``gid`` is ``<origin>-<entry id>``, the origin being a random id
  kept in the local store, so ids never collide between daemons. (The braces are Redis
  Cluster hash tags: an entry's two keys live in one slot.)
* **Following.** The same thread reads the stream and adds every other daemon's entry to
  the local store by its record and vectors only (:meth:`LatentCache.insert_remote`), so
  the local index finds it; its latents stay in Redis until its first hit here fetches
  them (:meth:`fetch`), checks them against the record's checksums, shape and dtype, and
  keeps them locally under the local budget.
* **Resilience.** No request waits on Redis or fails because of it. When Redis is down or
  slow the daemon serves from its local tier, says so in ``stats`` and the log, and keeps
  the ids it could not publish; when Redis answers again it publishes them, then imports
  whatever it missed by scanning the entry keys. A shared entry whose keys vanished (Redis
  eviction, a flush) is a miss for the request that hit it and is dropped here.
* **A budget of its own.** With ``budget_bytes`` set, the tier's entries (latents and
  vectors) are kept within it by least-recent use over the whole fleet: every publish adds
  the entry's size to ``<ns>:bytes`` and every publish or hit marks it in the sorted set
  ``<ns>:access``; one daemon at a time holds the lease ``<ns>:leader`` and evicts the
  least recently used entries past the budget, announcing each with an ``evict`` event.
  A follower drops its stub of an evicted entry (an entry whose latents it already fetched
  stays, as one of its own, under its local budget).
* **Exact repeats.** Final latents of served requests (chaid/engine/repeats.py) go to
  ``<ns>:r:<key>`` with a checksum and a time to live, so an identical request on any
  daemon is answered without denoising.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from chaid.store.cache import LatentCache
from chaid.store.db import REMOTE_KEY, SHARED_KEY, EntryRecord
from chaid.store.errors import StoreError

log = logging.getLogger(__name__)

# Seconds between attempts to reach a Redis that did not answer.
RETRY_S = 2.0
# How long one read of the stream waits for news: the thread's heartbeat, and the longest
# a new entry waits before it is published (the thread publishes between reads).
BLOCK_MS = 100
# Socket timeouts: a Redis that does not answer within this is "down" for this attempt.
TIMEOUT_S = 2.0
# Stream entries kept (approximately): enough for a daemon that was away a while; one that
# was away longer catches up by scanning the entry keys.
STREAM_MAXLEN = 100_000
# How long a served request's final latent stays in the tier for exact repeats.
REPEAT_TTL_S = 24 * 3600
# Final latents waiting to be written (older ones are dropped past this: best effort).
REPEAT_QUEUE = 64
# The eviction lease: held this long unless renewed (each turn of the leader's thread
# renews it), so a leader that dies is replaced within it.
LEADER_MS = 5000


class SharedTier:
    """Publishes this store's entries to Redis and follows the other daemons'."""

    def __init__(self, url: str, cache: LatentCache, *, namespace: str = "chaid",
                 cluster: bool = False, budget_bytes: int = 0, client: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self.budget_bytes = budget_bytes
        self.cache = cache
        self.ns = namespace
        self.cluster = cluster
        self.clock = clock
        self.origin = _origin_of(cache)
        self.embedder = cache.db.read_meta().get("embedder")
        self._client = client
        self._pending: set[int] = set()  # local entries not yet published
        self._repeats_out: list[tuple[str, bytes]] = []  # final latents not yet written
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_id = "$"
        self._synced = False
        self._logged: str | None = None  # the last error logged (an outage logs once)
        self.available = False
        self.leader = False
        self.last_error: str | None = None
        self.counts = {"published": 0, "imported": 0, "fetched": 0, "vanished": 0,
                       "dropped": 0, "evicted": 0, "errors": 0}
        cache.fetch_remote = self.fetch

    # -- keys -----------------------------------------------------------------------------

    def _entry_key(self, gid: str) -> str:
        return f"{self.ns}:e:{{{gid}}}"

    def _latents_key(self, gid: str) -> str:
        return f"{self.ns}:l:{{{gid}}}"

    @property
    def _log_key(self) -> str:
        return f"{self.ns}:log"

    @property
    def _bytes_key(self) -> str:
        return f"{self.ns}:bytes"

    @property
    def _access_key(self) -> str:
        return f"{self.ns}:access"

    @property
    def _leader_key(self) -> str:
        return f"{self.ns}:leader"

    def gid(self, entry_id: int) -> str:
        return f"{self.origin}-{entry_id}"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> SharedTier:
        """Start the background thread (publishing, following, reconnecting)."""
        self._thread = threading.Thread(target=self._run, name="chaid-shared", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)

    def publish(self, entry_id: int) -> None:
        """Queue a local entry for publishing (returns at once)."""
        with self._lock:
            self._pending.add(entry_id)
        self._wake.set()

    def put_repeat(self, key: str, blob: bytes) -> None:
        """Queue a served request's final latent for the tier (returns at once)."""
        with self._lock:
            self._repeats_out.append((key, blob))
            del self._repeats_out[:-REPEAT_QUEUE]
        self._wake.set()

    def get_repeat(self, key: str) -> bytes | None:
        """A served request's final latent from the tier, checked; None if absent, damaged
        or the tier is unavailable (never an error)."""
        import redis

        if not self.available:
            return None
        try:
            raw = self._redis().get(self._repeat_key(key))
        except (redis.RedisError, OSError):
            return None
        if raw is None or len(raw) < _DIGEST or _digest(raw[_DIGEST:]) != raw[:_DIGEST]:
            return None
        return raw[_DIGEST:]

    def _repeat_key(self, key: str) -> str:
        return f"{self.ns}:r:{key}"

    def _write_repeats(self, client: Any) -> None:
        while True:
            with self._lock:
                if not self._repeats_out:
                    return
                key, blob = self._repeats_out[0]
            client.set(self._repeat_key(key), _digest(blob) + blob, ex=REPEAT_TTL_S)
            with self._lock:
                if self._repeats_out and self._repeats_out[0][0] == key:
                    self._repeats_out.pop(0)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            pending = len(self._pending)
        return {"url": _redacted(self.url), "namespace": self.ns, "origin": self.origin,
                "available": self.available, "pending": pending,
                "budget_bytes": self.budget_bytes, "leader": self.leader, **self.counts,
                "last_error": self.last_error}

    # -- the thread -----------------------------------------------------------------------

    def _redis(self) -> Any:
        if self._client is None:
            import redis

            opts = {"socket_timeout": TIMEOUT_S + BLOCK_MS / 1000,
                    "socket_connect_timeout": TIMEOUT_S}
            if self.cluster:
                from redis.cluster import RedisCluster

                self._client = RedisCluster.from_url(self.url, **opts)
            else:
                self._client = redis.Redis.from_url(self.url, **opts)
        return self._client

    def _run(self) -> None:
        import redis

        while not self._stop.is_set():
            try:
                client = self._redis()
                if not self._synced:
                    client.ping()
                    self._became(True)  # fetches may go on while the sync runs
                    self._resync(client)
                self._publish_pending(client)
                self._write_repeats(client)
                self._follow(client)
                self._enforce_budget(client)
                self._became(True)
            except (redis.RedisError, OSError) as exc:
                self._became(False, exc)
                self._synced = False  # what was missed meanwhile is found by the next sync
                self._stop.wait(RETRY_S)
            except Exception:  # a bug must not kill the thread silently: log, wait, go on
                log.exception("shared tier: unexpected error")
                self.counts["errors"] += 1
                self._stop.wait(RETRY_S)

    def _became(self, up: bool, exc: BaseException | None = None) -> None:
        if up and not self.available:
            log.info("shared tier %s reachable", _redacted(self.url))
        if not up:
            self.counts["errors"] += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self.available or self.last_error != self._logged:
                log.warning("shared tier %s unavailable (%s); serving from the local "
                            "cache", _redacted(self.url), self.last_error)
                self._logged = self.last_error
        self.available = up

    def _resync(self, client: Any) -> None:
        """After a start or an outage: note where the stream is, publish every local entry
        the tier lacks, then import every entry of the others this store lacks."""
        info = client.xinfo_stream(self._log_key) if client.exists(self._log_key) else None
        self._last_id = info["last-generated-id"] if info else "0-0"
        if isinstance(self._last_id, bytes):
            self._last_id = self._last_id.decode()
        for record in self.cache.records():
            if record.extra.get(SHARED_KEY) is None and \
                    not client.exists(self._entry_key(self.gid(record.entry_id))):
                self.publish(record.entry_id)
        for key in client.scan_iter(match=f"{self.ns}:e:*", count=500):
            key = key.decode() if isinstance(key, bytes) else key
            gid = key[key.index("{") + 1:-1]
            self._import(client, gid)
        self._synced = True

    def _publish_pending(self, client: Any) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                entry_id = min(self._pending)
            self._publish(client, entry_id)  # raises on a Redis error: the id stays pending
            with self._lock:
                self._pending.discard(entry_id)

    def _publish(self, client: Any, entry_id: int) -> None:
        gid = self.gid(entry_id)
        if client.exists(self._entry_key(gid)):
            return  # published before an outage cut the acknowledgement short
        try:
            record, latents = self.cache.raw_latents(entry_id)
            vectors, prompt_vector = self.cache.vectors_of(record)
        except StoreError:  # evicted (or damaged) before it could be published
            return
        vector_bytes = np.ascontiguousarray(vectors, "<f4").tobytes()
        prompt_bytes = np.ascontiguousarray(prompt_vector, "<f4").tobytes()
        size = sum(len(b) for b in latents.values()) + len(vector_bytes) + len(prompt_bytes)
        meta = {"prompt": record.prompt, "entities": record.entities,
                "fingerprint": record.fingerprint, "shape": record.shape,
                "dtype": record.dtype, "steps": record.steps, "checksums": record.checksums,
                "extra": {k: v for k, v in record.extra.items() if k != "owner_uid"},
                "embedder": self.embedder, "origin": self.origin, "created": record.created}
        pipe = client.pipeline(transaction=False)
        pipe.hset(self._latents_key(gid), mapping={str(s): b for s, b in latents.items()})
        pipe.hset(self._entry_key(gid), mapping={
            "meta": json.dumps(meta), "vectors": vector_bytes, "prompt_vector": prompt_bytes,
            "bytes": size})
        pipe.execute()
        # The budget's bookkeeping: the tier's size, and the entry's last use.
        pipe = client.pipeline(transaction=False)
        pipe.incrby(self._bytes_key, size)
        pipe.zadd(self._access_key, {gid: self.clock()})
        pipe.execute()
        client.xadd(self._log_key, {"op": "insert", "gid": gid}, maxlen=STREAM_MAXLEN,
                    approximate=True)
        self.counts["published"] += 1

    def _follow(self, client: Any) -> None:
        wait = 0 if self._wake.is_set() else BLOCK_MS
        self._wake.clear()
        news = client.xread({self._log_key: self._last_id}, block=wait, count=500)
        for _stream, events in news or []:
            for event_id, fields in events:
                self._last_id = event_id.decode() if isinstance(event_id, bytes) else event_id
                fields = {_s(k): _s(v) for k, v in fields.items()}
                if fields.get("op") == "insert":
                    self._import(client, fields.get("gid", ""))
                elif fields.get("op") == "evict":
                    self._drop_stub(fields.get("gid", ""))

    def _drop_stub(self, gid: str) -> None:
        """Forget an entry the tier evicted, unless its latents were fetched here."""
        entry_id = self.cache.entry_for(gid)
        if entry_id is None:
            return
        try:
            if self.cache.get_record(entry_id).extra.get(REMOTE_KEY):
                self.cache.evict([entry_id])
        except StoreError:
            pass

    def _enforce_budget(self, client: Any) -> None:
        """As the leader, evict the least recently used entries past the tier's budget."""
        if not self.budget_bytes:
            return
        me = self.origin.encode()
        if client.set(self._leader_key, me, nx=True, px=LEADER_MS):
            self.leader = True
        elif client.get(self._leader_key) == me:
            client.pexpire(self._leader_key, LEADER_MS)
            self.leader = True
        else:
            self.leader = False
            return
        total = int(client.get(self._bytes_key) or 0)
        while total > self.budget_bytes:
            oldest = client.zrange(self._access_key, 0, 63)
            if not oldest:
                client.set(self._bytes_key, 0)  # nothing left to account for
                return
            for raw in oldest:
                gid = _s(raw)
                size = int(client.hget(self._entry_key(gid), "bytes") or 0)
                pipe = client.pipeline(transaction=False)
                pipe.delete(self._entry_key(gid))
                pipe.delete(self._latents_key(gid))
                pipe.zrem(self._access_key, gid)
                pipe.decrby(self._bytes_key, size)
                pipe.xadd(self._log_key, {"op": "evict", "gid": gid}, maxlen=STREAM_MAXLEN,
                          approximate=True)
                pipe.execute()
                self.counts["evicted"] += 1
                total -= size
                if total <= self.budget_bytes:
                    return

    def _import(self, client: Any, gid: str) -> None:
        if gid.startswith(f"{self.origin}-") or self.cache.entry_for(gid) is not None:
            return
        raw = client.hgetall(self._entry_key(gid))
        if not raw:
            return  # gone already
        raw = {_s(k): v for k, v in raw.items()}
        try:
            meta = json.loads(raw["meta"])
            if meta.get("embedder") != self.embedder:
                return  # another embedder's vectors do not compare with ours
            dim = self.cache.dim
            vectors = np.frombuffer(raw["vectors"], "<f4").reshape(-1, dim)
            prompt_vector = np.frombuffer(raw["prompt_vector"], "<f4")
            if prompt_vector.shape != (dim,):
                raise ValueError(f"prompt vector of {prompt_vector.size} values, not {dim}")
            self.cache.insert_remote(gid, meta, vectors, prompt_vector)
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("shared entry %s is malformed (%s); skipped", gid, exc)
            self.counts["dropped"] += 1
            return
        except StoreError as exc:
            log.warning("shared entry %s not added: %s", gid, exc)
            return
        self.counts["imported"] += 1

    # -- the fetch (on a request's thread) ----------------------------------------------

    def fetch(self, record: EntryRecord) -> dict[int, bytes] | None:
        """The latents of a shared entry, or None when the tier cannot give them (down, or
        the entry is gone there: then it is dropped here too)."""
        import redis

        gid = record.extra.get(SHARED_KEY)
        if gid is None or not self.available:
            return None
        try:
            raw = self._redis().hgetall(self._latents_key(gid))
        except (redis.RedisError, OSError) as exc:
            log.warning("shared entry %s: fetch failed (%s)", gid, exc)
            return None
        if not raw:
            self.counts["vanished"] += 1
            log.info("shared entry %s is gone from the tier; dropping it", gid)
            threading.Thread(target=self.cache.evict, args=([record.entry_id],),
                             daemon=True).start()
            return None
        try:  # a hit is a use: it keeps the entry in the tier's budget (best effort)
            self._redis().zadd(self._access_key, {gid: self.clock()})
        except (redis.RedisError, OSError):
            pass
        self.counts["fetched"] += 1
        try:
            return {int(_s(k)): v for k, v in raw.items()}
        except ValueError:
            return {}  # fails the record's checks: quarantined by the caller


_DIGEST = 16


def _digest(blob: bytes) -> bytes:
    import hashlib

    return hashlib.blake2b(blob, digest_size=_DIGEST).digest()


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _origin_of(cache: LatentCache) -> str:
    """This store's random origin id, made on first use and kept in its meta."""
    origin = cache.db.read_meta().get("origin")
    if origin is None:
        origin = uuid.uuid4().hex[:12]
        cache.db.write(lambda txn: cache.db.put_meta(txn, "origin", origin))
    return origin


def _redacted(url: str) -> str:
    """The URL without a password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
