"""The shared vocabulary of Rack and Mixer, sans-IO: what crosses the Snake and how it is spelled.

    vocab      StrEnums: RackStatus, ApplyState, HelloStatus, LogLevel, TelemetryKind, CtrlVerb,
               CommandVerb
    meta       the metadata keys gears share (conn.id, error.reason, ...)
    subjects   the only builders of Snake subjects, streams, consumers and bus users
    messages   frozen wire messages (Hello, HeartbeatReply, ...) with encode/decode
    telemetry  the telemetry batch format (NDJSON per kind)
    envelope   the one signed-envelope verifier (Ed25519, pinned keys, signing context)

Nothing here does I/O or imports asyncio or nats; the Mixer imports this package, never
`fluxrig.agent`.
"""

from .vocab import (
    TRAFFIC_STATUSES,
    ApplyState,
    CommandVerb,
    CtrlVerb,
    HelloStatus,
    LogLevel,
    RackStatus,
    TelemetryKind,
)

__all__ = [
    "TRAFFIC_STATUSES",
    "ApplyState",
    "CommandVerb",
    "CtrlVerb",
    "HelloStatus",
    "LogLevel",
    "RackStatus",
    "TelemetryKind",
]
