"""The Rack's agent towards the Mixer: enrollment, passport, heartbeats, reload signals.

`RackAgent` (agent.py) and `TelemetryShipper` (shipper.py) are what the runtime wires in;
`subjects`, `protocol` and `telemetry` are the sans-IO wire contract shared with the Mixer
(fluxrig_mixer imports them).
Nothing here imports the Mixer, DuckDB or an HTTP framework.
"""

__all__ = ["RackAgent", "AgentConfig", "TelemetryShipper"]


def __getattr__(name):  # lazy: importing the wire contract must not import nats
    if name in ("RackAgent", "AgentConfig"):
        from . import agent

        return getattr(agent, name)
    if name == "TelemetryShipper":
        from .shipper import TelemetryShipper

        return TelemetryShipper
    raise AttributeError(name)
