"""Scenarios and the active scenario in the shared state (issue 14 item 2): storage only.

Job. `SharedScenarios` keeps every node's `ScenarioStore` (scenarios.py: the DuckDB tables,
a read cache here) in step with the replicated buckets, so a Rack served by any node gets
the same projection. Projection code (which gears go to which Rack) stays in scenarios.py and
is not touched here.

Keys.
- Bucket `fluxrig-scenarios`, key = the document's SHA-256 (content-addressed: two nodes
  importing the same document write the same key; `create` makes the second a no-op). The
  value is `{name, version, format, text, doc, imported_at}`; a value over
  `INLINE_MAX_BYTES` keeps only its metadata and puts the JSON in the object store
  `fluxrig-scenario-docs` under the digest (object stores chunk, so a large scenario is no
  problem for the 1 MiB message limit).
- Bucket `fluxrig-state`, key `active`: `{digest, ts, node, detail}`, written by
  compare-and-set on the revision this node last saw: two nodes activating at once, the
  second gets StateConflict (409) and must look again. The key's history is the activation
  history (16 revisions); every node also appends each activation it sees to its table.

Contract.
- `start()` replays both buckets into the local store before the node serves anything.
- `publish(stored)` puts a local import into the KV (idempotent).
- `activate(stored, detail)` publishes the document, then moves `active` by CAS, then marks it
  locally. StateConflict / StateUnavailable (kv.py): nothing changed.
- A node that sees `active` move (watch) loads the document (local, else from the KV) and
  marks it active locally; `on_active(stored)` is then called (e.g. lane consumers re-sync).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.js import api

from .kv import Bucket, Change, StateConflict, StateUnavailable, follow
from .scenarios import ScenarioStore, StoredScenario

__all__ = ["SharedScenarios", "INLINE_MAX_BYTES", "ACTIVE_KEY", "DOCS_STORE"]

log = logging.getLogger("fluxrig.mixer.scenariostate")

INLINE_MAX_BYTES = 256 * 1024  # larger documents go to the object store
ACTIVE_KEY = "active"
DOCS_STORE = "fluxrig-scenario-docs"


class SharedScenarios:
    def __init__(self, store: ScenarioStore, scenarios: Bucket, state: Bucket, node: str, replicas: int = 1):
        self.store = store
        self.scenarios = scenarios
        self.state = state
        self.node = node
        self.replicas = replicas
        self.on_active: Callable[[StoredScenario], object] | None = None
        self._active_rev = 0
        self._objects = None
        self._tasks: list[asyncio.Task] = []
        self._pending: set[asyncio.Task] = set()

    async def _object_store(self):
        if self._objects is None:
            js = self.scenarios.js
            try:
                self._objects = await js.object_store(DOCS_STORE)
            except nats.js.errors.BucketNotFoundError:
                self._objects = await js.create_object_store(
                    config=api.ObjectStoreConfig(
                        bucket=DOCS_STORE, replicas=self.replicas, storage=api.StorageType.FILE
                    )
                )
        return self._objects

    async def start(self, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        ready = [asyncio.Event(), asyncio.Event()]
        self._tasks = [
            loop.create_task(follow(self.scenarios, self._on_docs, ready[0]), name="kv-follow-scenarios"),
            loop.create_task(follow(self.state, self._on_state, ready[1]), name="kv-follow-state"),
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), timeout)
        # Local imports from before the shared state (or while it was away) go up once.
        for s in self.store.list():
            await self.publish(s)
        self.store.on_import = self._schedule_publish

    async def stop(self) -> None:
        self.store.on_import = None
        for t in [*self._tasks, *self._pending]:
            t.cancel()
        self._tasks = []

    # -- documents -------------------------------------------------------------------------------

    def _schedule_publish(self, stored: StoredScenario) -> None:
        t = asyncio.get_running_loop().create_task(self._publish_logged(stored), name="scenario-publish")
        self._pending.add(t)
        t.add_done_callback(self._pending.discard)

    async def _publish_logged(self, stored: StoredScenario) -> None:
        try:
            await self.publish(stored)
        except Exception as exc:  # activate() publishes again before anything depends on it
            log.warning("scenario %s not in the shared state yet: %s", stored.version, exc)

    async def publish(self, stored: StoredScenario) -> None:
        doc_json = json.dumps(stored.doc, default=str)
        value = {
            "name": stored.name,
            "version": stored.meta_version,
            "format": stored.source_format,
            "imported_at": stored.imported_at.timestamp() if hasattr(stored.imported_at, "timestamp") else time.time(),
        }
        if len(doc_json) + len(stored.source_text) > INLINE_MAX_BYTES:
            obj = await self._object_store()
            payload = json.dumps({"doc": stored.doc, "text": stored.source_text}, default=str).encode()
            await obj.put(stored.digest, payload)
            value["object"] = True
        else:
            value.update(doc=stored.doc, text=stored.source_text)
        try:
            await self.scenarios.create(stored.digest, value)
        except StateConflict:
            pass  # content-addressed: the same document is already there

    async def _load(self, digest: str, value: dict | None = None) -> StoredScenario | None:
        """The scenario of `digest` in the local store, fetched from the KV when missing."""
        try:
            return self.store.get(digest)
        except Exception:
            pass
        if value is None:
            cur = await self.scenarios.get(digest)
            if cur is None:
                return None
            value = cur.value
        if value.get("object"):
            obj = await self._object_store()
            payload = json.loads((await obj.get(digest)).data)
            doc, text = payload["doc"], payload["text"]
        else:
            doc, text = value["doc"], value["text"]
        stored, _ = self.store.import_checked(doc, text, value.get("format", "yaml"), notify=False)
        return stored

    async def _on_docs(self, changes: list[Change], initial: bool) -> None:
        for c in changes:
            if isinstance(c.value, dict):
                try:
                    await self._load(c.key, c.value)
                except Exception as exc:
                    log.warning("scenario %s from the shared state not stored here: %s", c.key[:12], exc)

    # -- activation ------------------------------------------------------------------------------

    async def _on_state(self, changes: list[Change], initial: bool) -> None:
        for c in changes:
            if c.key != ACTIVE_KEY or not isinstance(c.value, dict) or c.revision <= self._active_rev:
                continue
            stored = await self._load(c.value["digest"])
            if stored is None:
                log.error("active scenario %s is not in the shared state", c.value["digest"][:12])
                continue
            self._active_rev = c.revision
            current = self.store.active()
            if current is None or current.digest != stored.digest:
                self.store.mark_active(stored, c.value.get("detail", "") or f"by {c.value.get('node', '?')}")
                log.info("scenario %s active (by %s)", stored.version, c.value.get("node", "?"))
                if self.on_active is not None and not initial:
                    res = self.on_active(stored)
                    if asyncio.iscoroutine(res):
                        await res

    async def activate(self, stored: StoredScenario, detail: str = "") -> None:
        """Make `stored` the cluster's active scenario (CAS on what this node last saw)."""
        await self.publish(stored)
        value = {"digest": stored.digest, "ts": time.time(), "node": self.node, "detail": detail}
        try:
            if self._active_rev:
                rev = await self.state.update(ACTIVE_KEY, value, self._active_rev)
            else:
                rev = await self.state.create(ACTIVE_KEY, value)
        except (StateConflict, StateUnavailable):
            raise
        except (TimeoutError, nats.errors.Error) as exc:
            raise StateUnavailable(self.state.name, ACTIVE_KEY, repr(exc)) from None
        self._active_rev = rev
        self.store.mark_active(stored, detail)
