"""Operator identity shared by every node of a cluster: named API tokens and console logouts.

Job. Make a token created or revoked on one Mixer node, and a console logout on one node,
count on every node at once (issues 14 and 19). Before, both lived in each node's
mixer.duckdb: a token made on node 1 was refused by node 2, and a logged-out session's
copied cookie still opened node 2.

Contract.
- The source of truth is the KV bucket `fluxrig-operators` (kv.BUCKETS): key
  `token.<hex of the name>` holds a token's public record with its SHA-256 digest (never the
  token), key `logout.<digest of the session id>` a logout's expiry. Each node follows the
  bucket (kv.follow) and applies every change to its TokenStore and SessionStore, whose
  mixer.duckdb tables become a cache (what a node knows before the bucket answered).
- `create_token` writes the bucket first, by create (a live token of that name anywhere in
  the cluster: TokenNameTaken, 409); a revoked one of that name is replaced by revision. Only
  then is the token stored here and shown. `revoke` marks the bucket's record revoked (cas),
  then here. Without quorum both raise StateUnavailable (503): nothing is reported done that
  the cluster did not take.
- A logout is remembered here at once and written to the bucket in the background; if that
  write fails it is logged at ERROR (the other nodes accept the cookie until it expires).
- Each node's first-start token (`<state_dir>/api-token`) stays that node's own: it is in
  no table and cannot be revoked through the API.
- `start` publishes the tokens this node's table has and the bucket lacks (a node that ran
  before the sharing), then waits for the bucket's replay; expired logouts found there are
  deleted.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..kv import Bucket, Change, StateConflict, follow
from .auth import Authenticator, TokenNameTaken, TokenRecord

__all__ = ["SharedIdentity", "token_key", "LOGOUT_PREFIX", "TOKEN_KEY_PREFIX"]

log = logging.getLogger("fluxrig.mixer.api")

TOKEN_KEY_PREFIX = "token."
LOGOUT_PREFIX = "logout."
STOP_WAIT_S = 2.0  # at most this long for the watch and pending logout writes at stop


def token_key(name: str) -> str:
    """Token names may hold '@', which a KV key may not: the name goes hex-encoded."""
    return TOKEN_KEY_PREFIX + name.encode("utf-8").hex()


def _value(rec: TokenRecord) -> dict:
    return {**rec.public(), "digest": rec.digest}


def _record(value: dict) -> TokenRecord | None:
    try:
        return TokenRecord(
            str(value["name"]),
            str(value["role"]),
            str(value["digest"]),
            float(value["created_at"]),
            None if value.get("expires_at") is None else float(value["expires_at"]),
            None if value.get("revoked_at") is None else float(value["revoked_at"]),
            str(value.get("created_by") or ""),
        )
    except (KeyError, TypeError, ValueError):
        return None


class SharedIdentity:
    def __init__(self, auth: Authenticator, bucket: Bucket):
        self.auth = auth
        self.bucket = bucket
        self._task: asyncio.Task | None = None
        self._bg: set[asyncio.Task] = set()

    async def start(self, timeout: float) -> None:
        tokens = self.auth.tokens
        for rec in tokens.list():
            if rec.builtin:
                continue
            try:
                await self.bucket.create(token_key(rec.name), _value(rec))
            except StateConflict:
                pass  # the cluster has one of that name: the follow below brings it here
        ready = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            follow(self.bucket, self._apply, ready), name="operators-follow"
        )
        await asyncio.wait_for(ready.wait(), timeout)
        self.auth.sessions.on_logout = self._logout
        self.auth.shared = self

    async def stop(self) -> None:
        self.auth.shared = None
        self.auth.sessions.on_logout = None
        # Bounded: the watch's clean-up (an UNSUB) must not hold up the Mixer's stop.
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=STOP_WAIT_S)
            self._task = None
        if self._bg:
            await asyncio.wait(list(self._bg), timeout=STOP_WAIT_S)

    async def create_token(self, name: str, role: str, ttl: float | None, created_by: str):
        tokens = self.auth.tokens
        rec, token = tokens.new(name, role, ttl, created_by)  # checked here: bad input is a 400 first
        key = token_key(name)
        try:
            await self.bucket.create(key, _value(rec))
        except StateConflict:
            cur = await self.bucket.get(key)
            if cur is None or not isinstance(cur.value, dict) or cur.value.get("revoked_at") is None:
                raise TokenNameTaken(name) from None
            try:
                await self.bucket.update(key, _value(rec), cur.revision)
            except StateConflict:
                raise TokenNameTaken(name) from None
        tokens.apply(rec)
        log.info("API token %r created (role %s) by %s, cluster-wide", name, role, created_by or "?")
        return rec, token

    async def revoke(self, name: str, by: str) -> None:
        rec = self.auth.tokens.revocable(name)
        now = time.time()

        def revoked(v):
            if not isinstance(v, dict):  # only in this node's table (made before the sharing)
                return dict(_value(rec), revoked_at=now)
            return None if v.get("revoked_at") is not None else dict(v, revoked_at=now)

        await self.bucket.cas(token_key(name), revoked)
        log.info("API token %r revoked by %s, cluster-wide", name, by or "?")

    def _logout(self, digest: str, expires_at: float) -> None:
        task = asyncio.get_running_loop().create_task(self._put_logout(digest, expires_at))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _put_logout(self, digest: str, expires_at: float) -> None:
        try:
            await self.bucket.put(LOGOUT_PREFIX + digest, {"expires_at": expires_at})
        except Exception as exc:
            log.error("console logout not shared with the cluster (other nodes accept the session until it "
                      "expires): %s", exc)  # fmt: skip

    async def _apply(self, changes: list[Change], initial: bool) -> None:
        now = time.time()
        for c in changes:
            if c.value is None or not isinstance(c.value, dict):
                continue
            if c.key.startswith(TOKEN_KEY_PREFIX):
                rec = _record(c.value)
                if rec is None:
                    log.error("shared API token %s is unreadable: ignored", c.key)
                    continue
                self.auth.tokens.apply(rec)
            elif c.key.startswith(LOGOUT_PREFIX):
                try:
                    expires_at = float(c.value["expires_at"])
                except (KeyError, TypeError, ValueError):
                    continue
                if expires_at > now:
                    self.auth.sessions.remember_logout(c.key[len(LOGOUT_PREFIX) :], expires_at)
                elif initial:  # nobody needs it any more: keep the bucket small
                    try:
                        await self.bucket.delete(c.key, c.revision)
                    except Exception:
                        pass  # another node deleted it, or no quorum: the next start tries again
