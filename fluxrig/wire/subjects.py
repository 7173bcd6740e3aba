"""Every Snake subject, stream, consumer and bus-user name of the Rack <-> Mixer contract.

The builders here are the only way a subject is spelled, in the Rack and in the Mixer (the
wildcard ones included: the Mixer's subscriptions, stream filters and bus permissions are built
from the same functions as the Rack's publishes, so the two can never drift apart).

Subject planes (ARCHITECTURE §7). Rack names are the `<rack>` token: they match
`^[a-z0-9_-]+$` (the scenario grammar), so they are always one safe subject token.

    fluxrig.agent.hello                    Rack -> Mixer request (enrollment), via the enroll user
    fluxrig.agent.heartbeat.<rack>         Rack -> Mixer request (liveness + apply reports)
    flux.telemetry.<rack>.logs|metrics|traces   Rack -> JetStream stream flux-telemetry
    flux.msg.<rack>.<gear>.<port>          guaranteed lane, JetStream stream flux-msg
    flux.ctrl.<rack>.<verb>                Mixer -> Rack (CtrlVerb: reload, passport carry a signed
                                           passport; CommandVerb: kill, revive, gear-stop,
                                           conn-close, shutdown, log-level are signed commands)

Each Rack's replies come back on its own inbox prefix `_INBOX_<rack>` so its bus user may
subscribe to its replies and to nobody else's.
"""

from __future__ import annotations

import re

from .vocab import CommandVerb, CtrlVerb, TelemetryKind

__all__ = [
    "js_stream_leader_stepdown",
    "js_nak_advisories",
    "HELLO",
    "MIXER_LIVENESS",
    "HEARTBEAT_PREFIX",
    "STREAM_MSG",
    "MIXER_AUDIT",
    "STREAM_AUDIT",
    "STREAM_TELEMETRY",
    "ENROLL_USER",
    "ENROLL_INBOX",
    "RACK_NAME_RE",
    "MAX_RACK_NAME",
    "heartbeat",
    "heartbeat_all",
    "telemetry",
    "telemetry_all",
    "telemetry_of",
    "msg",
    "msg_all",
    "msg_of",
    "ctrl",
    "ctrl_of",
    "inbox_prefix",
    "inbox_of",
    "rack_consumer",
    "rack_consumer_api",
    "group_consumer",
    "group_consumer_api",
    "group_relay",
    "group_relay_all",
    "saf_stream",
    "saf_subject",
    "saf_checkpoint_part",
    "saf_subjects",
    "saf_member_api",
    "enroll_inbox_all",
    "sanitize_rack_name",
    "rack_of_subject",
    "verb_of_subject",
    "check_rack_name",
]

HELLO = "fluxrig.agent.hello"
HEARTBEAT_PREFIX = "fluxrig.agent.heartbeat"
# Mixer nodes tell each other which Racks they heard (issue 14: heartbeats go to a queue
# group, so each node hears a share; the offline sweep needs them all). Racks cannot publish it.
MIXER_LIVENESS = "fluxrig.mixer.liveness"
# The operators' audit trail, shared by the Mixer nodes (issues 14 and 19: every node answers
# GET /api/v1/audit the same); its stream keeps it. Racks cannot publish it.
MIXER_AUDIT = "fluxrig.mixer.audit"
STREAM_AUDIT = "fluxrig-audit"
_TELEMETRY = "flux.telemetry"
_MSG = "flux.msg"
_CTRL = "flux.ctrl"
STREAM_MSG = "flux-msg"
STREAM_TELEMETRY = "flux-telemetry"
# Enrolling clients connect with no credentials: nats-server maps them (no_auth_user) to an
# identity that may only send Hello and read its replies. ENROLL_USER names it in messages;
# ENROLL_PASSWORD is gone (no bus password exists any more).
ENROLL_USER = "enroll"
ENROLL_INBOX = "_INBOX_ENROLL"
RACK_NAME_RE = re.compile(r"^[a-z0-9_-]+$")
MAX_RACK_NAME = 63


def check_rack_name(rack: str) -> str:
    """`rack` when it is a valid Rack name (one safe subject token), else ValueError."""
    if not isinstance(rack, str) or not RACK_NAME_RE.match(rack) or len(rack) > MAX_RACK_NAME:
        raise ValueError(f"invalid rack name {rack!r}: use 1-{MAX_RACK_NAME} of a-z, 0-9, _ and -")
    return rack


def heartbeat(rack: str) -> str:
    return f"{HEARTBEAT_PREFIX}.{check_rack_name(rack)}"


def heartbeat_all() -> str:
    """What the Mixer subscribes to for every Rack's heartbeats."""
    return f"{HEARTBEAT_PREFIX}.*"


def telemetry(rack: str, kind: str) -> str:
    try:
        kind = TelemetryKind(kind)
    except ValueError:
        raise ValueError(f"telemetry kind {kind!r} is not one of {', '.join(TelemetryKind)}") from None
    return f"{_TELEMETRY}.{check_rack_name(rack)}.{kind}"


def telemetry_of(rack: str) -> str:
    """Every telemetry subject of one Rack (its bus permission)."""
    return f"{_TELEMETRY}.{check_rack_name(rack)}.>"


def telemetry_all() -> str:
    """Every Rack's telemetry (the stream's subjects, the Mixer's ingest filter)."""
    return f"{_TELEMETRY}.>"


def msg(rack: str, gear: str, port: str) -> str:
    return f"{_MSG}.{check_rack_name(rack)}.{gear}.{port}"


def msg_of(rack: str) -> str:
    """Every guaranteed-lane subject one Rack publishes (its bus permission)."""
    return f"{_MSG}.{check_rack_name(rack)}.>"


def msg_all() -> str:
    """Every guaranteed-lane subject (the flux-msg stream's subjects)."""
    return f"{_MSG}.>"


def ctrl(rack: str, verb: CtrlVerb | CommandVerb | str) -> str:
    return f"{_CTRL}.{check_rack_name(rack)}.{verb}"


def ctrl_of(rack: str) -> str:
    """Every control subject of one Rack (what it subscribes to)."""
    return f"{_CTRL}.{check_rack_name(rack)}.>"


def inbox_prefix(rack: str) -> str:
    return f"_INBOX_{check_rack_name(rack)}"


def inbox_of(rack: str) -> str:
    """Every reply subject of one Rack (its bus permission)."""
    return f"{inbox_prefix(rack)}.>"


def rack_consumer(rack: str) -> str:
    """Durable consumer on flux-msg through which a Rack pulls its inbound guaranteed wires."""
    return f"in-{check_rack_name(rack)}"


def rack_consumer_api(rack: str) -> tuple[str, ...]:
    """The JetStream API subjects a Rack's bus user needs for its own consumer, and no other:
    pull the next batch, read the consumer's info, acknowledge."""
    consumer = rack_consumer(rack)
    return (
        f"$JS.API.CONSUMER.MSG.NEXT.{STREAM_MSG}.{consumer}",
        f"$JS.API.CONSUMER.INFO.{STREAM_MSG}.{consumer}",
        f"$JS.ACK.{STREAM_MSG}.{consumer}.>",
    )


def group_consumer(group: str) -> str:
    """Durable consumer on flux-msg shared by the members of a Rack group (issue 17): the
    group's inputs from outside it. `grp-` never begins a Rack's `in-` consumer."""
    return f"grp-{check_rack_name(group)}"


def group_consumer_api(group: str) -> tuple[str, ...]:
    """The JetStream API subjects a member's bus user needs for its group's shared consumer."""
    consumer = group_consumer(group)
    return (
        f"$JS.API.CONSUMER.MSG.NEXT.{STREAM_MSG}.{consumer}",
        f"$JS.API.CONSUMER.INFO.{STREAM_MSG}.{consumer}",
        f"$JS.ACK.{STREAM_MSG}.{consumer}.>",
    )


def js_stream_leader_stepdown(stream: str) -> str:
    """JetStream API: the stream's Raft leader steps down, another replica is elected (cluster, issue 14)."""
    return f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}"


def js_nak_advisories(stream: str) -> str:
    """JetStream advisory: a message of `stream` was NAKed, one per NAK, any consumer (the Mixer's purge)."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MSG_NAKED.{stream}.*"


def group_relay(group: str, gear: str) -> str:
    """Core NATS subject on which the members of a Rack group relay to each other what one of
    them cannot handle itself (issue 17 item 3: a reply whose ticket another member holds).
    Not under `flux.msg.>`: nothing on it is stored by the flux-msg stream."""
    return f"flux.grp.{check_rack_name(group)}.{gear}.relay"


def group_relay_all(group: str) -> str:
    """Every relay subject of a group (a member's bus permission, both ways)."""
    return f"flux.grp.{check_rack_name(group)}.>"


def saf_stream(group: str) -> str:
    """The JetStream stream that mirrors the saga journals of a Rack group's conductors
    (issue 17 item 4: a survivor claims a dead member's owed reversals from it). One stream
    per group, so a member's bus permissions name its own groups' streams and no other."""
    return f"fluxrig-saf-{check_rack_name(group)}"


def saf_subject(group: str, gear: str, rack: str) -> str:
    """The mirror of one member's saga journal for one conductor gear (its events, its lease
    beats, and the claim a survivor writes on it: fluxrig.saga.mirror_wire)."""
    return f"flux.saf.{check_rack_name(group)}.{gear}.{check_rack_name(rack)}"


def saf_checkpoint_part(subject: str, slot: int, index: int) -> str:
    """Where part `index` of a checkpoint too big for one message lies, beside the mirror
    `subject` (fluxrig.saga.mirror_wire: two slots, so the parts the last checkpoint names
    stand while the next one is written). Not matched by saf_subjects(group, gear)."""
    return f"{subject}.cp{int(slot)}.{int(index)}"


def saf_subjects(group: str, gear: str | None = None) -> str:
    """Every mirror subject of a group (the stream's subjects), or of one of its gears."""
    return f"flux.saf.{check_rack_name(group)}.{gear}.*" if gear else f"flux.saf.{check_rack_name(group)}.>"


def saf_member_api(group: str) -> tuple[str, ...]:
    """What a member's bus user may publish for its group's saga mirror: the mirror subjects
    (its own, and a claim on a dead member's: members of a group vouch for each other, they
    share the key that seals card numbers), and the read side of the group's stream only
    (its info with a subject filter, direct gets by subject)."""
    stream = saf_stream(group)
    return (
        saf_subjects(group),
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
    )


def enroll_inbox_all() -> str:
    """Every reply subject of the shared enroll user (its bus permission)."""
    return f"{ENROLL_INBOX}.>"


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


def verb_of_subject(subject: str) -> str:
    """The last token of a control subject (`flux.ctrl.<rack>.<verb>`)."""
    return subject.rsplit(".", 1)[-1]
