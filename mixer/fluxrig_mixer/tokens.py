"""Enrollment tokens: scoped, counted, expiring, revocable; stored hashed.

Job. Admit new Racks (issue 12 item 4). A token is `frt_<id>_<secret>`; the store keeps, per
id, the SHA-256 of the whole token (the secret has 256 bits, so a plain hash is enough: there
is nothing to brute-force), how many uses are left, when it expires, the labels and the Rack
name it gives, and when it was revoked. Nothing in the store lets anyone enroll.

    fluxrig-mixer tokens create [--uses N] [--ttl D] [--labels k=v,...] [--name RACK] [--bundle FILE]
    fluxrig-mixer tokens list
    fluxrig-mixer tokens revoke ID

Storage: `<state_dir>/enroll-tokens.json` (0600), rewritten atomically under an exclusive
flock on `<file>.lock`, so the CLI works whether or not the Mixer runs (the Mixer holds the
DuckDB file; this file is shared) and a use is never counted twice. The Mixer re-reads the
file when its mtime changes, so a token created or revoked by the CLI counts at the next Hello.

Shared state (issue 14): a running Mixer node spends tokens through `SharedTokens` (below),
in the replicated bucket `fluxrig-tokens`, so a token made on one node admits a Hello that
another node serves, and its uses are counted once cluster-wide.

Contract. `consume(token)` spends one use and returns a Grant (labels, rack name, token id),
or a Grant whose `refused` says why (unknown, revoked, expired, spent): a refused token spends
nothing and registers nothing. The first-start token (`first-start`) is created with
`enrollment.first_token_uses` uses (1 unless the operator says otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field

from fluxrig.errors import ConfigError
from fluxrig.fileutil import write_private_atomic
from fluxrig.wire import subjects as S

__all__ = [
    "TokenStore",
    "SharedTokens",
    "Grant",
    "TOKEN_PREFIX",
    "TOKENS_FILE",
    "FIRST_TOKEN_ID",
    "first_token_id",
    "MAX_TOKENS",
    "MAX_TOKEN_LABELS",
    "parse_labels",
    "offline_bundle",
]

TOKEN_PREFIX = "frt_"
TOKENS_FILE = "enroll-tokens.json"
FIRST_TOKEN_ID = "first-start"
SECRET_BYTES = 32
MAX_TOKENS = 10_000
MAX_TOKEN_LABELS = 32
MAX_LABEL_CHARS = 128
MAX_SPEND_BATCH = 256  # uses of one token spent in one shared-state write (SharedTokens._spend)
_ID_RE = re.compile(r"^[a-z0-9-]{1,32}$")
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,63}$")


def first_token_id(node: str | None = None) -> str:
    """The id of a node's first-start token: FIRST_TOKEN_ID alone, or in a cluster (`node`,
    its server name) `first-<name>-<hash>`, so that every node's first-start bundle works: the
    shared token state keeps one record per id, and three nodes each creating "first-start"
    left two of the three bundles refused. Within the id's 32 characters (a-z, 0-9, -)."""
    if not node:
        return FIRST_TOKEN_ID
    slug = re.sub(r"[^a-z0-9]+", "-", node.lower()).strip("-")[:16].strip("-") or "node"
    return f"first-{slug}-{hashlib.sha256(node.encode()).hexdigest()[:6]}"


@dataclass(frozen=True)
class Grant:
    refused: str | None = None
    token_id: str = ""
    labels: dict = field(default_factory=dict)
    rack_name: str = ""


def parse_labels(text: str | list[str] | None) -> dict[str, str]:
    """`k=v,k2=v2` (or a list of `k=v`) -> dict; ConfigError naming the bad pair."""
    if not text:
        return {}
    parts = text if isinstance(text, list) else [text]
    out: dict[str, str] = {}
    for part in parts:
        for pair in str(part).split(","):
            pair = pair.strip()
            if not pair:
                continue
            k, sep, v = pair.partition("=")
            if not sep or not _LABEL_KEY_RE.match(k.strip()) or len(v) > MAX_LABEL_CHARS:
                raise ConfigError(f"{pair!r} is not key=value (key: A-Z a-z 0-9 _ . -)", "--labels")
            out[k.strip()] = v.strip()
    if len(out) > MAX_TOKEN_LABELS:
        raise ConfigError(f"at most {MAX_TOKEN_LABELS} labels", "--labels")
    return out


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """The token file of one state dir (see the module docstring)."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, TOKENS_FILE)
        self._lock_path = self.path + ".lock"
        self._cache: dict | None = None
        self._mtime: float = -1.0

    # -- file ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> dict:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return {"tokens": {}}
        if self._cache is not None and st.st_mtime_ns == self._mtime:
            return self._cache
        with open(self.path, encoding="utf-8") as fh:
            try:
                doc = json.load(fh)
            except ValueError as exc:
                raise ConfigError(f"{self.path} is not JSON ({exc}); restore it from a backup", "tokens") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("tokens"), dict):
            raise ConfigError(f"{self.path}: no 'tokens' map", "tokens")
        self._cache, self._mtime = doc, st.st_mtime_ns
        return doc

    def _write(self, doc: dict) -> None:
        write_private_atomic(self.path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
        self._cache, self._mtime = doc, os.stat(self.path).st_mtime_ns

    @property
    def exists(self) -> bool:
        return os.path.exists(self.path)

    # -- operations --------------------------------------------------------------------------------

    def create(
        self,
        *,
        uses: int | None = 1,
        ttl: float | None = None,
        labels: dict | None = None,
        rack_name: str = "",
        token_id: str | None = None,
        now: float | None = None,
    ) -> tuple[str, dict]:
        """(token, its public record). `uses` None or 0 = unlimited; `ttl` seconds or None."""
        now = time.time() if now is None else now
        if uses is not None and uses < 0:
            raise ConfigError("must be 0 (unlimited) or more", "--uses")
        if ttl is not None and ttl <= 0:
            raise ConfigError("must be positive", "--ttl")
        if rack_name:
            try:
                S.check_rack_name(rack_name)
            except ValueError as exc:
                raise ConfigError(str(exc), "--name") from None
        labels = dict(labels or {})
        if len(labels) > MAX_TOKEN_LABELS:
            raise ConfigError(f"at most {MAX_TOKEN_LABELS} labels", "--labels")
        token_id = token_id or secrets.token_hex(4)
        if not _ID_RE.match(token_id):
            raise ConfigError("a token id is 1-32 of a-z, 0-9 and -", "id")
        token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
        record = {
            "sha256": _hash(token),
            "uses_left": None if not uses else int(uses),
            "uses": 0,
            "created_at": now,
            "expires_at": None if ttl is None else now + ttl,
            "labels": labels,
            "rack_name": rack_name,
            "revoked_at": None,
            "racks": [],
        }
        with self._locked():
            doc = self._read()
            if token_id in doc["tokens"]:
                raise ConfigError(f"token id {token_id!r} exists", "id")
            if len(doc["tokens"]) >= MAX_TOKENS:
                raise ConfigError(f"{MAX_TOKENS} tokens stored: revoke and prune some first", "tokens")
            doc = {"tokens": dict(doc["tokens"], **{token_id: record})}
            self._write(doc)
        return token, self._public(token_id, record, now)

    def _public(self, token_id: str, r: dict, now: float) -> dict:
        return {
            "id": token_id,
            "state": self._state(r, now) or "usable",
            "uses": r["uses"],
            "uses_left": r["uses_left"],
            "expires_at": r["expires_at"],
            "created_at": r["created_at"],
            "revoked_at": r["revoked_at"],
            "labels": r["labels"],
            "rack_name": r["rack_name"],
            "racks": r.get("racks", []),
        }

    @staticmethod
    def _state(r: dict, now: float) -> str | None:
        if r.get("revoked_at"):
            return "revoked"
        if r.get("expires_at") is not None and now >= r["expires_at"]:
            return "expired"
        if r.get("uses_left") is not None and r["uses_left"] <= 0:
            return "spent"
        return None

    def list(self, now: float | None = None) -> list[dict]:
        now = time.time() if now is None else now
        doc = self._read()
        return sorted((self._public(i, r, now) for i, r in doc["tokens"].items()), key=lambda t: t["created_at"])

    def revoke(self, token_id: str, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        with self._locked():
            doc = self._read()
            r = doc["tokens"].get(token_id)
            if r is None:
                raise ConfigError(f"no token {token_id!r} (see `fluxrig-mixer tokens list`)", "id")
            r = dict(r, revoked_at=r.get("revoked_at") or now)
            self._write({"tokens": dict(doc["tokens"], **{token_id: r})})
        return self._public(token_id, r, now)

    def record_use(self, token_id: str, shared: dict) -> None:
        """Mirror the counts of a use spent in the shared state (SharedTokens) into this file,
        so `tokens list` here shows it; SharedTokens.push never sends counts back."""
        with self._locked():
            doc = self._read()
            r = doc["tokens"].get(token_id)
            if r is None or r.get("sha256") != shared.get("sha256"):
                return
            r = dict(r, uses=shared["uses"], uses_left=shared["uses_left"], racks=shared.get("racks", []))
            self._write({"tokens": dict(doc["tokens"], **{token_id: r})})

    def consume(self, token: str, rack_name: str = "", now: float | None = None) -> Grant:
        """Spend one use of `token` (see the module docstring)."""
        now = time.time() if now is None else now
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
            return Grant("unknown enrollment token")
        token_id = token[len(TOKEN_PREFIX) :].partition("_")[0]
        with self._locked():
            doc = self._read()
            r = doc["tokens"].get(token_id)
            if r is None or not hmac.compare_digest(r["sha256"], _hash(token)):
                return Grant("unknown enrollment token")
            state = self._state(r, now)
            if state:
                return Grant(f"enrollment token {token_id} is {state}")
            left = r["uses_left"]
            r = dict(
                r,
                uses=r["uses"] + 1,
                uses_left=None if left is None else left - 1,
                racks=(r.get("racks", []) + [rack_name])[-100:],
            )
            self._write({"tokens": dict(doc["tokens"], **{token_id: r})})
        return Grant(None, token_id, dict(r["labels"]), r["rack_name"])


def offline_bundle(cfg, token: str, urls: list[str] | None = None) -> str:
    """A bundle for `token` from the files of `cfg`'s state dir, without a running Mixer (the
    CLI): the CA (`snake.tls_ca_file` or `certs/ca.pem`), the Mixer key (`cluster.key.pub`),
    and the URLs given, else those of the running Mixer's own `enroll-bundle`, else
    `snake.advertise_host` (or this host's name) and `snake.port`."""
    import socket

    from fluxrig.passport import parse_public_key
    from fluxrig.wire.bundle import Bundle, BundleError, ca_der_sha256, encode_bundle, read_bundle

    state = cfg.base.state_dir
    ca_path = cfg.snake.tls_ca_file or os.path.join(state, "certs", "ca.pem")
    try:
        with open(ca_path, encoding="ascii") as fh:
            ca_pem = fh.read()
        with open(os.path.join(state, "cluster.key.pub"), encoding="ascii") as fh:
            key = parse_public_key(fh.read()).hex()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {exc.filename}: start the Mixer once (it creates its CA and key)", "base.state_dir"
        ) from None
    if not urls:
        try:
            urls = list(read_bundle(os.path.join(state, "enroll-bundle")).urls)
        except BundleError:
            host = cfg.snake.advertise_host or socket.gethostname()
            urls = [f"tls://{host}:{cfg.snake.port}"]
    return encode_bundle(Bundle(tuple(urls), ca_pem, ca_der_sha256(ca_pem), (key,), token, cfg.base.name))


class SharedTokens:
    """The enrollment tokens every Mixer node sees (issue 14): bucket `fluxrig-tokens` of the
    shared state (kv.py), key = token id, value = the file's record (hash, uses, expiry, ...).

    The node's own file stays where tokens are created and revoked (the CLI works without a
    running Mixer); `push()` brings new ids and revocations into the KV (never uses: those are
    counted there), and runs at start, then whenever the file changes (`poll`). `consume()`
    spends a use by compare-and-set on the KV record, so two nodes admitting Hellos with the
    same one-use token at once admit one Rack. A token id created on two nodes with different
    secrets keeps the first one pushed (the other is refused as unknown and logged).
    """

    POLL_S = 1.0

    def __init__(self, store: TokenStore, bucket):
        self.store = store
        self.bucket = bucket
        self._pushed_mtime: int | None = None
        self._task = None
        self._waiting: dict[str, list] = {}  # token id -> [(rack name, now, future)] waiting for a round
        self._spending: dict[str, asyncio.Task] = {}  # token id -> its rounds of spends (one at a time)

    async def push(self) -> int:
        """New ids and revocations of the file into the KV; how many records were written."""
        import logging

        from .kv import StateConflict

        try:
            self._pushed_mtime = os.stat(self.store.path).st_mtime_ns
        except FileNotFoundError:
            return 0
        wrote = 0
        for token_id, r in self.store._read()["tokens"].items():
            try:
                await self.bucket.create(token_id, r)
                wrote += 1
                continue
            except StateConflict:
                pass
            cur = await self.bucket.get(token_id)
            if cur is None:
                continue
            if cur.value.get("sha256") != r.get("sha256"):
                logging.getLogger("fluxrig.mixer.tokens").warning(
                    "enrollment token %s of this node's file differs from the cluster's (created on two nodes?): "
                    "the cluster's stays; revoke one and create a new token",
                    token_id,
                )
                continue
            if r.get("revoked_at") and not cur.value.get("revoked_at"):
                await self.bucket.cas(token_id, lambda v, at=r["revoked_at"]: dict(v, revoked_at=at) if v else None)
                wrote += 1
        return wrote

    async def poll(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(self.POLL_S)
            try:
                if os.stat(self.store.path).st_mtime_ns != self._pushed_mtime:
                    await self.push()
            except FileNotFoundError:
                pass
            except Exception as exc:  # retried at the next change or poll
                import logging

                logging.getLogger("fluxrig.mixer.tokens").warning("pushing tokens to the shared state: %s", exc)
                self._pushed_mtime = None

    def start(self):
        import asyncio

        self._task = asyncio.get_running_loop().create_task(self.poll(), name="tokens-push")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _mtime_now(self) -> int | None:
        try:
            return os.stat(self.store.path).st_mtime_ns
        except FileNotFoundError:
            return None

    async def consume(self, token: str, rack_name: str = "", now: float | None = None) -> Grant:
        """Spend one use of `token` in the shared state (see TokenStore.consume)."""
        now = time.time() if now is None else now
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
            return Grant("unknown enrollment token")
        token_id = token[len(TOKEN_PREFIX) :].partition("_")[0]
        if not _ID_RE.match(token_id):
            return Grant("unknown enrollment token")
        try:  # a token created or revoked in this node's file counts at once, not at the next poll
            if os.stat(self.store.path).st_mtime_ns != self._pushed_mtime:
                await self.push()
        except FileNotFoundError:
            pass
        cur = await self.bucket.get(token_id)
        if cur is None:  # created in this node's file a moment ago
            await self.push()
            cur = await self.bucket.get(token_id)
        if cur is None or not hmac.compare_digest(cur.value.get("sha256", ""), _hash(token)):
            return Grant("unknown enrollment token")
        return await self._spend(token_id, rack_name, now)

    async def _spend(self, token_id: str, rack_name: str, now: float) -> Grant:
        """One use of `token_id`, spent together with every other Hello waiting on that token
        on this node: a fleet enrolling with one token sends its Hellos at once, and one
        compare-and-set per Hello, one at a time (racing ones lost 9 times in a row), held
        enrollment to ~45 per second. Each round spends all that wait (at most
        MAX_SPEND_BATCH) in one write; the first ones get the uses left, the rest are refused."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(token_id, []).append((rack_name, now, waiter))
        if token_id not in self._spending:
            task = asyncio.get_running_loop().create_task(self._spend_rounds(token_id), name="token-spend")
            self._spending[token_id] = task
        return await waiter

    async def _spend_rounds(self, token_id: str) -> None:
        queue = self._waiting[token_id]
        try:
            while queue:
                batch = queue[:MAX_SPEND_BATCH]
                del queue[: len(batch)]
                try:
                    grants = await self._spend_round(token_id, [name for name, _t, _w in batch], batch[0][1])
                except asyncio.CancelledError:
                    queue[:0] = batch
                    raise
                except Exception as exc:  # StateUnavailable ...: each Hello of the round hears it
                    grants = [exc] * len(batch)
                for (_name, _t, waiter), grant in zip(batch, grants):
                    if waiter.done():
                        continue
                    if isinstance(grant, Exception):
                        waiter.set_exception(grant)
                    else:
                        waiter.set_result(grant)
        finally:
            self._spending.pop(token_id, None)
            self._waiting.pop(token_id, None)
            for _name, _t, waiter in queue:  # stopped: the Hellos still waiting are not answered
                waiter.cancel()

    async def _spend_round(self, token_id: str, names: list[str], now: float) -> list[Grant]:
        verdict: dict = {}

        def spend(r):
            verdict.clear()
            if r is None:
                verdict["refused"] = "unknown enrollment token"
                return None
            state = TokenStore._state(r, now)
            if state:
                verdict["refused"] = f"enrollment token {token_id} is {state}"
                return None
            left = r["uses_left"]
            n = len(names) if left is None else min(left, len(names))
            verdict["record"], verdict["granted"] = r, n
            return dict(
                r,
                uses=r["uses"] + n,
                uses_left=None if left is None else left - n,
                racks=(r.get("racks", []) + names[:n])[-100:],
            )

        got = await self.bucket.cas(token_id, spend)
        if verdict.get("refused"):
            return [Grant(verdict["refused"])] * len(names)
        r, n = verdict["record"], verdict["granted"]
        unchanged = self._pushed_mtime == self._mtime_now()
        self.store.record_use(token_id, got.value)  # `tokens list` on this node counts it too
        if unchanged:  # our own write: nothing new to push
            self._pushed_mtime = self._mtime_now()
        granted = [Grant(None, token_id, dict(r["labels"]), r["rack_name"]) for _ in range(n)]
        return granted + [Grant(f"enrollment token {token_id} is spent")] * (len(names) - n)
