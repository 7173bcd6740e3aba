"""ISO 8583 network management of one client leg (sign-on, echo test, sign-off): sans-IO.

A host link is not usable because its TCP connection is: the issuer expects a sign-on first
(0800 with DE 70 = 001), answers it 0810 with DE 39 = 00, then the acquirer proves the link is
alive with echo tests (0800, DE 70 = 301) and signs off (0800, DE 70 = 002) before it closes.
`LegNetMgmt` is that conversation for one connection, with no I/O and no clock of its own:

    nm = LegNetMgmt(settings, spec)
    actions = nm.connected(now)            # [Send(frame)] the sign-on (or Up() with sign_on off)
    actions = nm.feed(body, now)           # None: not ours, pass it to the graph; else actions
    actions = nm.tick(now)                 # echo due, timeouts, N failed echoes in a row
    frame = nm.sign_off(now)               # the 0800/002 to write before closing (or None)

Actions: `Send(body)` (an encoded message to write on the leg), `Up()` (the sign-on was
answered 00: the leg may carry traffic now), `Down(reason)` (close the connection: the sign-on
was refused or not answered in `echo_timeout`, or `echo_max_failures` echoes in a row were not
answered 00 in `echo_timeout`). The caller (io_iso8583, client mode) announces the link up only
on `Up()`, closes it on `Down()` and its dial loop reconnects and signs on again.

Our 0800s carry DE 7 (UTC MMDDhhmmss), DE 11 (a STAN of their own, 000001-999999, wrapping)
and DE 70; a 0810 is ours when its DE 11 is one we sent and still wait for; any other 0810 is
passed on (someone else's, e.g. a financial leg's own network traffic). A network request
from the host (0800) is answered 0810/00 with DE 7, 11 and 70 echoed when
`answer_host_requests` is on, and passed to the graph otherwise.

Every message goes through the spec the gear names (`network_management.spec`), i.e. the
project's own codec: what a leg cannot decode is not ours and passes through untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..durations import parse_duration
from ..errors import ConfigError
from .errors import Iso8583DecodeError, Iso8583EncodeError

__all__ = [
    "NETMGMT_SCHEMA",
    "NetMgmtSettings",
    "LegNetMgmt",
    "Send",
    "Up",
    "Down",
    "SIGN_ON",
    "SIGN_OFF",
    "ECHO",
    "STAN_MAX",
    "MAX_FAILURES_LIMIT",
    "transmission_time",
]

SIGN_ON, SIGN_OFF, ECHO = "001", "002", "301"  # DE 70 network management information codes
STAN_MAX = 999_999
MAX_FAILURES_LIMIT = 100  # echo_max_failures above this is a typo, not a policy
APPROVED = "00"

NETMGMT_SCHEMA = {
    "type": "object",
    "description": "client legs: ISO 8583 network management (sign-on, echo test, sign-off). "
    "The leg is announced up (conn.up on link.<gear>) only once its sign-on is answered 00",
    "properties": {
        "sign_on": {
            "type": "boolean",
            "default": True,
            "description": "send 0800 DE 70=001 on every new connection; traffic waits for its 0810 39=00",
        },
        "echo_interval": {
            "type": "string",
            "format": "duration",
            "default": "30s",
            "description": "send an echo test (0800 DE 70=301) this often; 0s = no echo",
        },
        "echo_timeout": {
            "type": "string",
            "format": "duration",
            "default": "5s",
            "description": "an echo or sign-on not answered in this time has failed",
        },
        "echo_max_failures": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_FAILURES_LIMIT,
            "default": 3,
            "description": "this many failed echoes in a row (timeout or DE 39 not 00) close the link "
            "(conn.down); the gear redials and signs on again",
        },
        "sign_off_on_stop": {
            "type": "boolean",
            "default": True,
            "description": "send 0800 DE 70=002 before the gear closes the link (stop, not reload handover)",
        },
        "answer_host_requests": {
            "type": "boolean",
            "default": True,
            "description": "answer the host's own 0800 (echo, sign-on) with 0810 39=00 instead of passing it on",
        },
        "spec": {
            "type": "string",
            "default": "moov:spec87ascii",
            "description": "the spec network messages are encoded and decoded with (as codec_iso8583's spec)",
        },
        "header": {
            "type": "string",
            "pattern": "^([0-9a-fA-F]{2})*$",
            "default": "",
            "description": "hex bytes written before each network message (a leg with header_type tpdu/fixed)",
        },
    },
    "additionalProperties": False,
}
# `fluxrig gears doc io_iso8583` lists top-level keys only: the block's own keys go in its row
NETMGMT_SCHEMA["description"] += ". Keys: " + "; ".join(
    f"{k} ({v['default']!r}): {v['description']}" for k, v in NETMGMT_SCHEMA["properties"].items()
)


@dataclass(frozen=True)
class Send:
    body: bytes  # an encoded ISO message, without length header


@dataclass(frozen=True)
class Up:
    pass


@dataclass(frozen=True)
class Down:
    reason: str


@dataclass(frozen=True)
class NetMgmtSettings:
    sign_on: bool = True
    echo_interval: float = 30.0
    echo_timeout: float = 5.0
    echo_max_failures: int = 3
    sign_off_on_stop: bool = True
    answer_host_requests: bool = True
    spec: str = "moov:spec87ascii"
    header: bytes = b""

    @classmethod
    def parse(cls, block: dict, where: str = "network_management") -> NetMgmtSettings:
        """From the gear's (schema-checked) block; ConfigError naming the key otherwise."""
        b = dict(block or {})
        out = {}
        for key in ("echo_interval", "echo_timeout"):
            raw = b.get(key, NETMGMT_SCHEMA["properties"][key]["default"])
            try:
                out[key] = parse_duration(raw)
            except ValueError as exc:
                raise ConfigError(str(exc), f"{where}.{key}") from exc
        if out["echo_timeout"] <= 0:
            raise ConfigError("must be above 0s (an unanswered message must fail some time)", f"{where}.echo_timeout")
        if out["echo_interval"] and out["echo_interval"] < out["echo_timeout"]:
            raise ConfigError(
                f"echo_interval {out['echo_interval']:g}s is shorter than echo_timeout "
                f"{out['echo_timeout']:g}s: raise it or lower echo_timeout (0s turns echo off)",
                f"{where}.echo_interval",
            )
        n = b.get("echo_max_failures", 3)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_FAILURES_LIMIT:
            raise ConfigError(f"must be an integer 1-{MAX_FAILURES_LIMIT}, got {n!r}", f"{where}.echo_max_failures")
        header = b.get("header", "") or ""
        try:
            hdr = bytes.fromhex(header)
        except ValueError as exc:
            raise ConfigError(f"not hex: {exc}", f"{where}.header") from exc
        return cls(
            sign_on=bool(b.get("sign_on", True)),
            echo_interval=out["echo_interval"],
            echo_timeout=out["echo_timeout"],
            echo_max_failures=n,
            sign_off_on_stop=bool(b.get("sign_off_on_stop", True)),
            answer_host_requests=bool(b.get("answer_host_requests", True)),
            spec=str(b.get("spec", "moov:spec87ascii")),
            header=hdr,
        )


def transmission_time(wall: float | None = None) -> str:
    """DE 7: MMDDhhmmss in UTC."""
    return time.strftime("%m%d%H%M%S", time.gmtime(time.time() if wall is None else wall))


class LegNetMgmt:
    """Sign-on / echo / sign-off state of one connection (module docstring)."""

    DOWN, SIGNING_ON, UP = "down", "signing_on", "up"

    def __init__(self, settings: NetMgmtSettings, spec, *, first_stan: int = 1):
        self.s = settings
        self.spec = spec
        self.state = self.DOWN
        self._stan = (first_stan - 1) % STAN_MAX
        self._waiting: dict[str, tuple[str, float]] = {}  # DE 11 -> (DE 70, sent at)
        self._next_echo = 0.0
        self.failures = 0  # failed echoes in a row
        self.stats = {
            "sign_ons_sent": 0,
            "sign_ons_answered": 0,
            "sign_ons_refused": 0,
            "echoes_sent": 0,
            "echoes_answered": 0,
            "echoes_failed": 0,
            "sign_offs_sent": 0,
            "host_requests_answered": 0,
            "links_dropped": 0,
        }

    # -- what the caller reports ---------------------------------------------------------------
    def connected(self, now: float) -> list:
        """A new connection: sign on (or, with sign_on off, the leg is up at once)."""
        self._waiting.clear()
        self.failures = 0
        self._next_echo = now + self.s.echo_interval
        if not self.s.sign_on:
            self.state = self.UP
            return [Up()]
        self.state = self.SIGNING_ON
        self.stats["sign_ons_sent"] += 1
        return [Send(self._request(SIGN_ON, now))]

    def adopted(self, now: float) -> None:
        """A connection a reload handed over already signed on: up, echo schedule restarts."""
        self.state = self.UP
        self._waiting.clear()
        self.failures = 0
        self._next_echo = now + self.s.echo_interval

    def lost(self) -> None:
        self.state = self.DOWN
        self._waiting.clear()

    def feed(self, body: bytes, now: float) -> list | None:
        """A message from the host. None: not network management of ours, pass it on."""
        if body[:4] not in (b"0800", b"0810") and not self._maybe_network(body):
            return None
        try:
            f = self.spec.decode(body)
        except Iso8583DecodeError:
            return None
        mti = str(f.get(0, ""))
        if mti == "0800" and self.s.answer_host_requests:
            reply = {0: "0810", 39: APPROVED}
            for k in (7, 11, 70):
                if f.get(k) is not None:
                    reply[k] = f[k]
            self.stats["host_requests_answered"] += 1
            return [Send(self._encode(reply))]
        if mti != "0810":
            return None
        stan = str(f.get(11, ""))
        waited = self._waiting.pop(stan, None)
        if waited is None:
            return None  # not an answer to one of ours
        code, ok = waited[0], str(f.get(39, "")) == APPROVED
        if code == SIGN_ON:
            if ok:
                self.stats["sign_ons_answered"] += 1
                self.state = self.UP
                self._next_echo = now + self.s.echo_interval
                return [Up()]
            self.stats["sign_ons_refused"] += 1
            return self._drop(f"sign-on refused (DE 39 {f.get(39)!r})")
        if code == ECHO:
            if ok:
                self.stats["echoes_answered"] += 1
                self.failures = 0
                return []
            return self._echo_failed(now, f"echo answered DE 39 {f.get(39)!r}")
        return []  # the answer to a sign-off

    def tick(self, now: float) -> list:
        """Timeouts and the echo schedule; call at least every echo_timeout / 4."""
        out: list = []
        for stan, (code, sent) in list(self._waiting.items()):
            if now - sent < self.s.echo_timeout:
                continue
            del self._waiting[stan]
            if code == SIGN_ON:
                return self._drop(f"sign-on not answered in {self.s.echo_timeout:g}s")
            if code == ECHO:
                out.extend(self._echo_failed(now, f"echo not answered in {self.s.echo_timeout:g}s"))
                if self.state == self.DOWN:
                    return out
        if self.state == self.UP and self.s.echo_interval and now >= self._next_echo:
            if not any(code == ECHO for code, _ in self._waiting.values()):  # one echo out at a time
                self.stats["echoes_sent"] += 1
                out.append(Send(self._request(ECHO, now)))
            self._next_echo = now + self.s.echo_interval
        return out

    def sign_off(self, now: float) -> bytes | None:
        """The 0800/002 to write before the gear closes a signed-on leg (None: nothing to send)."""
        if self.state != self.UP or not self.s.sign_off_on_stop:
            return None
        self.stats["sign_offs_sent"] += 1
        self.state = self.DOWN
        return self._request(SIGN_OFF, now)

    @property
    def awaiting(self) -> int:
        return len(self._waiting)

    # -- internals ------------------------------------------------------------------------------
    def _echo_failed(self, now: float, why: str) -> list:
        self.stats["echoes_failed"] += 1
        self.failures += 1
        if self.failures >= self.s.echo_max_failures:
            return self._drop(f"{self.failures} echo tests in a row failed (last: {why})")
        return []

    def _drop(self, reason: str) -> list:
        self.state = self.DOWN
        self._waiting.clear()
        self.stats["links_dropped"] += 1
        return [Down(reason)]

    def _request(self, code: str, now: float) -> bytes:
        self._stan = self._stan % STAN_MAX + 1
        stan = f"{self._stan:06d}"
        body = self._encode({0: "0800", 7: transmission_time(), 11: stan, 70: code})
        self._waiting[stan] = (code, now)  # a sign-off's answer is swallowed too, never timed
        return body

    def _encode(self, fields: dict) -> bytes:
        try:
            return self.s.header + self.spec.encode(fields)
        except Iso8583EncodeError as exc:  # a spec without DE 7/11/70 (or not n10/n6/n3)
            raise ConfigError(
                f"spec {self.s.spec!r} cannot encode a network message ({exc}): name a spec with DE 7, 11, 39 and 70",
                "network_management.spec",
            ) from exc

    def _maybe_network(self, body: bytes) -> bool:
        # a binary/BCD MTI (spec87hex, 93binary ...): 0x08 0x00 / 0x08 0x10
        return body[:2] in (b"\x08\x00", b"\x08\x10")

    def metrics(self) -> dict:
        m = dict(self.stats)
        m["netmgmt_state"] = self.state
        m["echo_failures_in_a_row"] = self.failures
        return m
