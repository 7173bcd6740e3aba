"""Shared control-plane state in JetStream KV: buckets, compare-and-set writes, watches.

Job. The one place the Mixer talks to JetStream KV (institutional.md §1.2). A bucket is the
stream `KV_<bucket>`; a key's revision is its stream sequence; a write names the revision it
read (`Nats-Expected-Last-Subject-Sequence`), so two Mixer nodes never overwrite each other's
change: the loser gets `StateConflict` (the API answers 409) and nothing of its write lands.

Contract.
- `open_buckets(js, replicas)` creates (or binds) every bucket in `BUCKETS` with `replicas`
  copies (1 on a single-node Mixer, 3 in a cluster: one code path, the replica count differs).
  Values are JSON objects (readable with `nats kv get`), except `passports` (raw bytes).
- `Bucket.get(key) -> Versioned | None`; `create(key, value)` (StateConflict when the key
  exists); `update(key, value, revision)` (StateConflict when the key moved past `revision`);
  `cas(key, fn)` reads, applies `fn(old) -> new` and writes, retrying a conflict up to
  `MAX_CAS_RETRIES` times: for machine writes (a heartbeat's apply report, a passport
  serial) where a concurrent change is merged rather than reported.
- Any other failure to write (no quorum on a partitioned node, a timeout, no JetStream) is
  `StateUnavailable` (API 503): the write did not happen as far as this node can tell, and
  the caller must not report success. A partitioned minority node therefore cannot write.
- `follow(bucket, on_batch)` is a task that delivers every change (first the current value
  of every key, then updates, in revision order) in batches to `on_batch(list[Change])`; it
  re-creates its ordered consumer after an error, replaying current values, so a node that
  lost its routes converges when it rejoins. `on_batch` must be idempotent (revisions tell
  old from new).
- Fencing: the revision a successful write returns is the token a later write must name
  (leases: lease.py). A stale revision never succeeds: the server checks it under its lock.

Raises: StateConflict, StateUnavailable (both FluxError).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js import api

from fluxrig.aiotools import finish_within, next_within
from fluxrig.errors import FluxError

__all__ = [
    "BUCKETS",
    "BucketSpec",
    "Bucket",
    "Buckets",
    "Change",
    "Versioned",
    "StateConflict",
    "StateUnavailable",
    "open_buckets",
    "follow",
    "MAX_CAS_RETRIES",
    "KV_WRITE_TIMEOUT_S",
    "MAX_VALUE_BYTES",
    "FOLLOW_BATCH",
    "until_available",
]

log = logging.getLogger("fluxrig.mixer.kv")

MAX_CAS_RETRIES = 8  # a machine write retried past this many conflicts is reported as one
KV_WRITE_TIMEOUT_S = 3.0  # a write without quorum answers nothing: give up and say so (503)
MAX_VALUE_BYTES = 1024 * 1024  # nats-server's default max payload; large scenarios: object store
FOLLOW_BATCH = 512  # changes handed to on_batch at once (one DuckDB transaction per batch)
CAS_BACKOFF_S = 0.01  # doubled per attempt, times a random fraction (a write takes ~ms)
FOLLOW_RETRY_S = 0.5  # pause before a failed watch is re-created


@dataclass(frozen=True, slots=True)
class BucketSpec:
    name: str
    history: int  # revisions kept per key (the status history of a Rack lives here)
    raw: bool = False  # values are bytes, not JSON


# The replicated state (ARCHITECTURE §10). Registry rows and their history; identities and
# names claimed once cluster-wide; passports as signed; singleton-duty leases; small shared
# documents (active scenario, roll-out progress).
BUCKETS = (
    BucketSpec("fluxrig-racks", history=16),
    BucketSpec("fluxrig-ids", history=4),
    BucketSpec("fluxrig-passports", history=1, raw=True),
    BucketSpec("fluxrig-leases", history=1),
    BucketSpec("fluxrig-state", history=16),
    BucketSpec("fluxrig-tokens", history=4),
    BucketSpec("fluxrig-scenarios", history=1),  # content-addressed: a key never changes
    BucketSpec("fluxrig-operators", history=4),  # API tokens and console logouts (api/shared_identity.py)
)


class StateConflict(FluxError):
    """Another Mixer node (or request) changed `key` in `bucket` after it was read: nothing
    was written. Reload and retry. `expected` is the revision the write named (0: create)."""

    def __init__(self, bucket: str, key: str, expected: int, detail: str = ""):
        self.bucket, self.key, self.expected = bucket, key, expected
        what = "already exists" if expected == 0 else f"changed since revision {expected}"
        super().__init__(
            f"{key} {what} (changed by another Mixer node or request at the same time): nothing was "
            f"written; reload and retry{': ' + detail if detail else ''}"
        )


class StateUnavailable(FluxError):
    """The shared state could not be written or read (no quorum: this node may be cut off
    from the cluster; or JetStream is down). A write that got no answer may still have been
    committed (the answer was lost in a leader change): read the key back before retrying
    (rackstate.py does)."""

    def __init__(self, bucket: str, key: str, reason: str):
        self.bucket, self.key, self.reason = bucket, key, reason
        super().__init__(
            f"the shared state ({bucket}/{key}) is unavailable from this Mixer node: {reason}. "
            "The change is not confirmed: look at the Rack again before retrying, or use another node of the cluster."
        )


@dataclass(frozen=True, slots=True)
class Versioned:
    value: object  # dict (JSON buckets) or bytes (raw buckets)
    revision: int


@dataclass(frozen=True, slots=True)
class Change:
    key: str
    value: object | None  # None: deleted or purged
    revision: int


_WRONG_LAST = (10071, 10164)  # JSStreamWrongLastSequence(Constant)Err


class Bucket:
    """One KV bucket with JSON (or raw) values and typed errors."""

    def __init__(self, spec: BucketSpec, kv, js, timeout: float = KV_WRITE_TIMEOUT_S):
        self.spec = spec
        self.name = spec.name
        self.kv = kv
        self.js = js
        self.timeout = timeout
        self._pre = f"$KV.{spec.name}."

    def encode(self, value) -> bytes:
        data = value if self.spec.raw else json.dumps(value, separators=(",", ":"), default=str).encode()
        if len(data) > MAX_VALUE_BYTES:
            raise FluxError(f"{self.name}: a value of {len(data)} bytes is over the limit of {MAX_VALUE_BYTES}")
        return data

    def decode(self, data: bytes):
        return bytes(data) if self.spec.raw else json.loads(data)

    async def get(self, key: str) -> Versioned | None:
        try:
            entry = await asyncio.wait_for(self.kv.get(key), self.timeout)
        except nats.js.errors.KeyNotFoundError:
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            raise StateUnavailable(self.name, key, _reason(exc)) from None
        if entry.value is None:
            return None
        return Versioned(self.decode(entry.value), entry.revision)

    async def _write(self, key: str, value, expected: int, msg_ttl: float | None = None) -> int:
        headers = {api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(expected)}
        try:
            ack = await self.js.publish(
                self._pre + key, self.encode(value), headers=headers, timeout=self.timeout, msg_ttl=msg_ttl
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST:
                raise StateConflict(self.name, key, expected) from None
            raise StateUnavailable(self.name, key, _reason(exc)) from None
        except (TimeoutError, nats.errors.Error) as exc:
            raise StateUnavailable(self.name, key, _reason(exc)) from None
        return ack.seq

    async def put(self, key: str, value) -> int:
        """Write `key` whatever its revision (a value only one writer decides, e.g. the
        passport bytes whose serial was reserved by cas())."""
        try:
            ack = await self.js.publish(self._pre + key, self.encode(value), timeout=self.timeout)
        except (TimeoutError, nats.errors.Error) as exc:
            raise StateUnavailable(self.name, key, _reason(exc)) from None
        return ack.seq

    async def create(self, key: str, value, msg_ttl: float | None = None) -> int:
        """Write `key` only if it does not exist (or was deleted); its new revision."""
        try:
            return await self._write(key, value, 0, msg_ttl)
        except StateConflict:
            # A deleted key keeps a tombstone: recreate on top of it, still by revision.
            try:
                entry = await asyncio.wait_for(self.kv._get(key), self.timeout)
            except nats.js.errors.KeyDeletedError as gone:
                return await self._write(key, value, gone.entry.revision, msg_ttl)
            except nats.js.errors.KeyNotFoundError:  # aged out (TTL) between the two calls
                return await self._write(key, value, 0, msg_ttl)
            except (TimeoutError, nats.errors.Error) as exc:
                raise StateUnavailable(self.name, key, _reason(exc)) from None
            raise StateConflict(self.name, key, 0, f"held at revision {entry.revision}") from None

    async def update(self, key: str, value, revision: int, msg_ttl: float | None = None) -> int:
        """Write `key` only if its last revision is still `revision`; the new revision."""
        if revision <= 0:
            raise ValueError("update needs the revision that was read (create() writes a new key)")
        return await self._write(key, value, revision, msg_ttl)

    async def delete(self, key: str, revision: int) -> None:
        try:
            await asyncio.wait_for(self.kv.delete(key, last=revision), self.timeout)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise StateConflict(self.name, key, revision) from None
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST:
                raise StateConflict(self.name, key, revision) from None
            raise StateUnavailable(self.name, key, _reason(exc)) from None
        except (TimeoutError, nats.errors.Error) as exc:
            raise StateUnavailable(self.name, key, _reason(exc)) from None

    async def cas(self, key: str, fn: Callable[[object | None], object | None], retries: int = MAX_CAS_RETRIES):
        """Read-modify-write with transparent retries: `fn(current value or None)` returns the
        new value (None: write nothing). Returns Versioned (the written or unchanged value) or
        None. StateConflict after `retries` lost races; StateUnavailable."""
        for attempt in range(retries + 1):
            cur = await self.get(key)
            new = fn(cur.value if cur is not None else None)
            if new is None:
                return cur
            try:
                if cur is None:
                    rev = await self.create(key, new)
                else:
                    rev = await self.update(key, new, cur.revision)
                return Versioned(new, rev)
            except StateConflict:
                # Jittered back-off: racers that retry in lock-step keep colliding.
                await asyncio.sleep(random.random() * CAS_BACKOFF_S * 2**attempt)
        raise StateConflict(self.name, key, cur.revision if cur else 0, f"lost {retries + 1} races in a row")


class Buckets:
    """Every bucket of BUCKETS by short name: `b.racks`, `b.ids`, `b.passports`, ..."""

    def __init__(self, by_name: dict[str, Bucket], replicas: int):
        self._by = by_name
        self.replicas = replicas
        self.racks = by_name["fluxrig-racks"]
        self.ids = by_name["fluxrig-ids"]
        self.passports = by_name["fluxrig-passports"]
        self.leases = by_name["fluxrig-leases"]
        self.state = by_name["fluxrig-state"]
        self.tokens = by_name["fluxrig-tokens"]
        self.scenarios = by_name["fluxrig-scenarios"]
        self.operators = by_name["fluxrig-operators"]


async def open_buckets(js, replicas: int = 1, timeout: float = KV_WRITE_TIMEOUT_S) -> Buckets:
    """Bind or create every bucket with `replicas` copies (file storage: sync_interval of the
    Snake applies). An existing bucket keeps its replica count (changing it is an operator
    step: `nats stream edit`); a mismatch is logged."""
    out = {}
    for spec in BUCKETS:
        try:
            kv = await js.key_value(spec.name)
            info = await js.stream_info(f"KV_{spec.name}")
            if info.config.num_replicas != replicas:
                log.warning(
                    "bucket %s has %d replica(s), the configuration asks for %d: left as it is",
                    spec.name,
                    info.config.num_replicas,
                    replicas,
                )
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(
                bucket=spec.name,
                history=spec.history,
                replicas=replicas,
                storage=api.StorageType.FILE,
                max_value_size=MAX_VALUE_BYTES,
                description="fluxrig-mixer shared state (kv.py)",
            )
        out[spec.name] = Bucket(spec, kv, js, timeout)
    return Buckets(out, replicas)


async def until_available(op: Callable[[], Awaitable], timeout: float, retry_s: float = FOLLOW_RETRY_S):
    """`await op()`, retried while it raises StateUnavailable, for up to `timeout` seconds: a
    bucket just created on a forming cluster has no stream leader for a moment and answers
    "no response from stream" (the last StateUnavailable is raised after the timeout)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await op()
        except StateUnavailable as exc:
            if asyncio.get_running_loop().time() + retry_s > deadline:
                raise
            log.info("shared state not writable yet (%s), retrying", exc.reason)
            await asyncio.sleep(retry_s)


async def follow(
    bucket: Bucket,
    on_batch: Callable[[list[Change], bool], Awaitable[None]],
    ready: asyncio.Event | None = None,
    retry_s: float = FOLLOW_RETRY_S,
) -> None:
    """Run forever: watch every key of `bucket`, hand changes to `on_batch(changes, initial)`
    (`initial`: part of the replay of current values). `ready` is set once the first replay
    is delivered. Re-watches after any error (a rejoining node replays current values)."""
    while True:
        watcher = None
        try:
            watcher = await bucket.kv.watchall()
            initial = True
            batch: list[Change] = []
            while True:
                try:  # not watcher.updates(): its wait_for can swallow the cancel that stops us
                    entry = await next_within(watcher, 0.05 if batch else 3600)
                except TimeoutError:
                    entry = False  # quiet: deliver what is gathered
                if entry is None:  # end of the initial replay
                    await on_batch(batch, True)
                    batch = []
                    initial = False
                    if ready is not None:
                        ready.set()
                    continue
                if entry is not False:
                    deleted = entry.operation is not None or entry.value is None
                    value = None if deleted else bucket.decode(entry.value)
                    batch.append(Change(entry.key, value, entry.revision))
                if batch and (entry is False or len(batch) >= FOLLOW_BATCH):
                    await on_batch(batch, initial)
                    batch = []
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("watch of %s failed (%s): re-watching in %.1f s", bucket.name, _reason(exc), retry_s)
            await asyncio.sleep(retry_s)
        finally:
            if watcher is not None:
                await finish_within(watcher.stop(), 2.0, f"stopping the watch of {bucket.name}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | nats.errors.TimeoutError):
        return "no answer in time (no quorum: this node may be cut off from the cluster)"
    if isinstance(exc, nats.js.errors.APIError):
        return f"JetStream: {exc.description or exc.err_code}"
    return f"{type(exc).__name__}: {exc}"
