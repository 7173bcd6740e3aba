"""Every Snake subject, stream and bus-user name of the Rack <-> Mixer contract, in one place.

Subject planes (ARCHITECTURE §7). Rack names are the `<rack>` token: they match
`^[a-z0-9_-]+$` (the scenario grammar), so they are always one safe subject token.

    fluxrig.agent.hello                    Rack -> Mixer request (enrollment), via the enroll user
    fluxrig.agent.heartbeat.<rack>         Rack -> Mixer request (liveness + apply reports)
    flux.telemetry.<rack>.logs|metrics|traces   Rack -> JetStream stream flux-telemetry
    flux.msg.<rack>.<gear>.<port>          guaranteed lane, JetStream stream flux-msg
    flux.ctrl.<rack>.<verb>                Mixer -> Rack (reload, passport, shutdown, log-level;
                                           signed kill switch commands: CTRL_COMMANDS, fluxrig/ctrl.py)

Each Rack's replies come back on its own inbox prefix `_INBOX_<rack>` so its bus user may
subscribe to its replies and to nobody else's.
"""

from __future__ import annotations

import re

__all__ = [
    "HELLO",
    "HEARTBEAT_PREFIX",
    "TELEMETRY_KINDS",
    "STREAM_MSG",
    "STREAM_TELEMETRY",
    "ENROLL_USER",
    "ENROLL_INBOX",
    "CTRL_VERBS",
    "CTRL_COMMANDS",
    "RACK_NAME_RE",
    "MAX_RACK_NAME",
    "heartbeat",
    "telemetry",
    "msg",
    "ctrl",
    "inbox_prefix",
    "rack_consumer",
    "sanitize_rack_name",
    "rack_of_subject",
]

HELLO = "fluxrig.agent.hello"
HEARTBEAT_PREFIX = "fluxrig.agent.heartbeat"
TELEMETRY_KINDS = ("logs", "metrics", "traces")
STREAM_MSG = "flux-msg"
STREAM_TELEMETRY = "flux-telemetry"
# The shared, password-public bus user that may only send Hello and read its replies.
ENROLL_USER = "enroll"
ENROLL_PASSWORD = "enroll"
ENROLL_INBOX = "_INBOX_ENROLL"
CTRL_RELOAD = "reload"
CTRL_PASSPORT = "passport"
CTRL_SHUTDOWN = "shutdown"
CTRL_LOG_LEVEL = "log-level"
CTRL_VERBS = (CTRL_RELOAD, CTRL_PASSPORT, CTRL_SHUTDOWN, CTRL_LOG_LEVEL)
# Kill switch verbs: the message is a signed command (fluxrig/ctrl.py), never a plain ctrl map.
CTRL_KILL = "kill"
CTRL_REVIVE = "revive"
CTRL_GEAR_STOP = "gear-stop"
CTRL_CONN_CLOSE = "conn-close"
CTRL_COMMANDS = (CTRL_KILL, CTRL_REVIVE, CTRL_GEAR_STOP, CTRL_CONN_CLOSE)
RACK_NAME_RE = re.compile(r"^[a-z0-9_-]+$")
MAX_RACK_NAME = 63


def _check(rack: str) -> str:
    if not isinstance(rack, str) or not RACK_NAME_RE.match(rack) or len(rack) > MAX_RACK_NAME:
        raise ValueError(f"invalid rack name {rack!r}: use 1-{MAX_RACK_NAME} of a-z, 0-9, _ and -")
    return rack


def heartbeat(rack: str) -> str:
    return f"{HEARTBEAT_PREFIX}.{_check(rack)}"


def telemetry(rack: str, kind: str) -> str:
    if kind not in TELEMETRY_KINDS:
        raise ValueError(f"telemetry kind {kind!r} is not one of {', '.join(TELEMETRY_KINDS)}")
    return f"flux.telemetry.{_check(rack)}.{kind}"


def msg(rack: str, gear: str, port: str) -> str:
    return f"flux.msg.{_check(rack)}.{gear}.{port}"


def ctrl(rack: str, verb: str) -> str:
    return f"flux.ctrl.{_check(rack)}.{verb}"


def inbox_prefix(rack: str) -> str:
    return f"_INBOX_{_check(rack)}"


def rack_consumer(rack: str) -> str:
    """Durable consumer on flux-msg through which a Rack pulls its inbound guaranteed wires."""
    return f"in-{_check(rack)}"


def sanitize_rack_name(text: str, fallback: str = "rack") -> str:
    """Lower-case, map anything outside [a-z0-9_-] to '-', trim, cap the length."""
    s = re.sub(r"[^a-z0-9_-]+", "-", (text or "").strip().lower()).strip("-_")
    return (s or fallback)[:MAX_RACK_NAME].rstrip("-_") or fallback


def rack_of_subject(subject: str) -> str | None:
    """The <rack> token of a heartbeat/telemetry/msg/ctrl subject, else None."""
    parts = subject.split(".")
    if subject.startswith(HEARTBEAT_PREFIX + ".") and len(parts) == 4:
        return parts[3]
    if len(parts) >= 3 and parts[0] == "flux" and parts[1] in ("telemetry", "msg", "ctrl"):
        return parts[2]
    return None
