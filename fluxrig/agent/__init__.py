"""The Rack's agent towards the Mixer: enrollment, passport, heartbeats, reload signals.

`RackAgent` (agent.py) is the class the runtime wires in; `subjects`, `protocol` and
`telemetry` are the sans-IO wire contract shared with the Mixer (fluxrig_mixer imports them).
Nothing here imports the Mixer, DuckDB or an HTTP framework.
"""

__all__ = ["RackAgent", "AgentConfig"]


def __getattr__(name):  # lazy: importing the wire contract must not import nats
    if name in ("RackAgent", "AgentConfig"):
        from . import agent

        return getattr(agent, name)
    raise AttributeError(name)
