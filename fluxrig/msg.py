"""FluxMsg: the one envelope that travels through every wire.

Field set and CBOR keys follow the Go original so the two interoperate: `id` (UUIDv7, 16
bytes), `ref_id`, `trace`, `src_id`, `meta` (str -> str), `data` (nested dict), `flags`
(bit 0 = convergence probe), `raw` (bytes), `path` (hops `{g, p, t}`), `ts` (Unix ns).

Inside one Rack a message is passed by reference; `copy()` is used only where a wire fans
out. CBOR is used only when a message crosses the Snake. Hops are kept as tuples in memory
and turned into `{g, p, t}` maps on the wire.

Raises MessageError for broken limits (64 hops, 2 MiB), non-UTF-8 metadata and bad dotted
paths.
"""

from __future__ import annotations

import copy as _copy
import time

import cbor2

from .errors import MessageError
from .ids import NIL, uuid7

__all__ = [
    "FluxMsg",
    "MAX_HOPS",
    "MAX_PAYLOAD_SIZE",
    "FLAG_SYNC_PROBE",
    "get_path",
    "set_path",
    "set_limits",
    "copy_tree",
]

MAX_HOPS = 64
MAX_PAYLOAD_SIZE = 2 * 1024 * 1024
# The limits in force in this process: rack.max_hops and rack.max_payload_size (set_limits).
_limits = [MAX_HOPS, MAX_PAYLOAD_SIZE]


def set_limits(max_hops: int, max_payload_size: int) -> None:
    """Apply the Rack's configured limits to every message of this process."""
    if max_hops < 1 or max_payload_size < 1:
        raise ValueError("message limits must be positive")
    _limits[0] = max_hops
    _limits[1] = max_payload_size


FLAG_SYNC_PROBE = 0x01
HEX_PREFIX = "hex:"

_time_ns = time.time_ns


def get_path(root: dict, path: str, default=None):
    """Walk a dotted path through nested dicts; `default` when any step is missing."""
    node = root
    for part in path.split("."):
        if isinstance(node, dict):
            if part in node:
                node = node[part]
                continue
            return default
        return default
    return node


def set_path(root: dict, path: str, value) -> None:
    """Set a dotted path, creating intermediate dicts; MessageError if a step is not a dict."""
    parts = path.split(".")
    node = root
    for i, part in enumerate(parts[:-1]):
        if not part:
            raise MessageError(f"dotted path {path!r} has an empty segment")
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            where = ".".join(parts[: i + 1])
            raise MessageError(f"cannot set {path!r}: {where!r} holds a {type(nxt).__name__}, not a map")
        node = nxt
    if not parts[-1]:
        raise MessageError(f"dotted path {path!r} has an empty segment")
    node[parts[-1]] = value


def _del_path(root: dict, path: str):
    parts = path.split(".")
    node = root
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return None
    return node.pop(parts[-1], None) if isinstance(node, dict) else None


_ATOMIC = frozenset((str, int, float, bool, bytes, type(None)))
_COPY_DEPTH = 64  # deeper than any message's data: past it, deepcopy's own bookkeeping


def copy_tree(value, _depth: int = 0):
    """A copy of JSON-like data (dicts and lists copied, str/int/float/bool/bytes/None shared):
    what FluxMsg.copy gives each receiver. 3-4x faster than copy.deepcopy on an ISO 8583
    message's fields (2.5 against 9.6 us), which the switch pays per request; anything else
    (another type, a structure past _COPY_DEPTH) goes through deepcopy."""
    t = type(value)
    if t is dict:
        if _depth > _COPY_DEPTH:
            return _copy.deepcopy(value)
        return {k: (v if type(v) in _ATOMIC else copy_tree(v, _depth + 1)) for k, v in value.items()}
    if t is list:
        if _depth > _COPY_DEPTH:
            return _copy.deepcopy(value)
        return [v if type(v) in _ATOMIC else copy_tree(v, _depth + 1) for v in value]
    if t in _ATOMIC:
        return value
    return _copy.deepcopy(value)


class FluxMsg:
    """The envelope. Construct with keyword arguments; unset ids are filled at emit."""

    __slots__ = ("id", "ref_id", "trace", "src_id", "meta", "data", "flags", "raw", "path", "ts")

    def __init__(
        self,
        raw: bytes = b"",
        meta: dict | None = None,
        data: dict | None = None,
        *,
        id: bytes | None = None,
        ref_id: bytes = NIL,
        trace: str = "",
        src_id: bytes = NIL,
        flags: int = 0,
        path: list | None = None,
        ts: int | None = None,
    ):
        self.id = id if id is not None else uuid7()
        self.ref_id = ref_id
        self.trace = trace
        self.src_id = src_id
        self.meta = meta if meta is not None else {}
        self.data = data if data is not None else {}
        self.flags = flags
        self.raw = raw
        self.path = path if path is not None else []
        self.ts = ts if ts is not None else _time_ns()

    # -- dotted paths over data ------------------------------------------------------------
    def get(self, path: str, default=None):
        """Read `data` by dotted path; `meta.<key>` reads metadata, `raw` the payload."""
        if path.startswith("meta."):
            return self.meta.get(path[5:], default)
        if path == "raw":
            return self.raw
        if path.startswith("data."):
            path = path[5:]
        return get_path(self.data, path, default)

    def set(self, path: str, value) -> None:
        """Write `data` by dotted path (creating maps); `meta.<key>` writes metadata."""
        if path.startswith("meta."):
            self.set_meta(path[5:], value)
        elif path == "raw":
            self.raw = value if isinstance(value, bytes) else str(value).encode()
        else:
            if path.startswith("data."):
                path = path[5:]
            set_path(self.data, path, value)

    def delete(self, path: str):
        """Remove a dotted path (data) or `meta.<key>`; returns the old value or None."""
        if path.startswith("meta."):
            return self.meta.pop(path[5:], None)
        if path.startswith("data."):
            path = path[5:]
        return _del_path(self.data, path)

    def set_meta(self, key: str, value) -> None:
        """Set metadata; bytes and invalid UTF-8 are stored as `hex:<hex>`."""
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                value = HEX_PREFIX + bytes(value).hex()
        elif not isinstance(value, str):
            value = str(value)
        self.meta[key] = value

    def set_meta_bytes(self, key: str, value: bytes) -> None:
        """Always store binary metadata as `hex:<hex>`."""
        self.meta[key] = HEX_PREFIX + bytes(value).hex()

    def meta_bytes(self, key: str) -> bytes | None:
        """Read metadata written by set_meta_bytes (or plain text) back as bytes."""
        value = self.meta.get(key)
        if value is None:
            return None
        if value.startswith(HEX_PREFIX):
            return bytes.fromhex(value[4:])
        return value.encode()

    # -- hops and copies ---------------------------------------------------------------------
    def hop(self, gear_id: bytes, port_id: bytes) -> None:
        """Append one hop; MessageError past the hop limit (a loop in the wiring)."""
        path = self.path
        if len(path) >= _limits[0]:
            raise MessageError(f"message {self.id.hex()} exceeded {_limits[0]} hops (a wiring loop?)")
        path.append((gear_id, port_id, _time_ns()))

    def copy(self) -> FluxMsg:
        """An independent copy for fan-out: nested data and the hop list are not shared."""
        m = FluxMsg.__new__(FluxMsg)
        m.id = self.id
        m.ref_id = self.ref_id
        m.trace = self.trace
        m.src_id = self.src_id
        m.meta = dict(self.meta)
        m.data = copy_tree(self.data) if self.data else {}
        m.flags = self.flags
        m.raw = self.raw
        m.path = list(self.path)
        m.ts = self.ts
        return m

    # -- limits and the wire form ------------------------------------------------------------
    def validate(self, max_hops: int | None = None, max_size: int | None = None) -> None:
        """Check the Go original's limits: hops, heuristic size, UTF-8 keys and values."""
        max_hops = _limits[0] if max_hops is None else max_hops
        max_size = _limits[1] if max_size is None else max_size
        if len(self.path) > max_hops:
            raise MessageError(f"{len(self.path)} hops exceeds the limit of {max_hops}")
        size = len(self.raw)
        for k, v in self.meta.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise MessageError(f"metadata {k!r} must be text; store binary as hex: via set_meta_bytes")
            size += len(k) + len(v)
        for k, v in self.data.items():
            if not isinstance(k, str):
                raise MessageError(f"data key {k!r} must be text")
            size += len(k)
            if isinstance(v, (str, bytes, bytearray)):
                size += len(v)
        if size > max_size:
            raise MessageError(f"message size {size} bytes exceeds the limit of {max_size}")

    def to_wire(self) -> dict:
        """The Go original's map: short keys, byte-string UUIDs, hops as {g, p, t}."""
        return {
            "id": self.id,
            "ref_id": self.ref_id,
            "trace": self.trace,
            "src_id": self.src_id,
            "meta": self.meta,
            "data": self.data,
            "flags": self.flags,
            "raw": self.raw,
            "path": [{"g": g, "p": p, "t": t} for g, p, t in self.path],
            "ts": self.ts,
        }

    def to_cbor(self) -> bytes:
        self.validate()
        return cbor2.dumps(self.to_wire())

    @classmethod
    def from_wire(cls, doc: dict) -> FluxMsg:
        if not isinstance(doc, dict):
            raise MessageError(f"a FluxMsg must be a CBOR map, got {type(doc).__name__}")
        try:
            path = [(h["g"], h["p"], h["t"]) for h in doc.get("path") or ()]
        except (KeyError, TypeError) as exc:
            raise MessageError(f"bad hop in path: {exc}") from None
        return cls(
            raw=doc.get("raw") or b"",
            meta=dict(doc.get("meta") or {}),
            data=dict(doc.get("data") or {}),
            id=doc.get("id") or NIL,
            ref_id=doc.get("ref_id") or NIL,
            trace=doc.get("trace") or "",
            src_id=doc.get("src_id") or NIL,
            flags=doc.get("flags") or 0,
            path=path,
            ts=doc.get("ts") or 0,
        )

    @classmethod
    def from_cbor(cls, blob: bytes) -> FluxMsg:
        try:
            doc = cbor2.loads(blob)
        except Exception as exc:  # cbor2 raises several types for bad input
            raise MessageError(f"not a CBOR FluxMsg: {exc}") from None
        msg = cls.from_wire(doc)
        msg.validate()
        return msg

    def __eq__(self, other) -> bool:
        return isinstance(other, FluxMsg) and self.to_wire() == other.to_wire()

    def __repr__(self) -> str:
        return f"FluxMsg(id={self.id.hex()}, meta={self.meta!r}, raw={len(self.raw)}B)"
