"""The Rack's side of the Snake: its session, the guaranteed lane and the telemetry pump.

    session    SnakeSession: the narrow protocol lanes and telemetry depend on
    agent      RackAgent: enrollment, passport, heartbeats, control (implements SnakeSession)
    publisher  WalPublisher: the one WAL -> JetStream pump (batching, window, adaptive pace)
    lanes      JetStreamBus: the guaranteed lane (the runtime's Bus)
    shipper    TelemetryShipper: the telemetry WAL through the pump

What crosses the Snake is spelled in fluxrig.wire (shared with the Mixer, which never imports
this package). Nothing here imports the Mixer, DuckDB or an HTTP framework; nats is imported
only when a session is opened.
"""

__all__ = ["RackAgent", "AgentConfig", "TelemetryShipper"]


def __getattr__(name):  # lazy: importing the package must not import nats
    if name in ("RackAgent", "AgentConfig"):
        from . import agent

        return getattr(agent, name)
    if name == "TelemetryShipper":
        from .shipper import TelemetryShipper

        return TelemetryShipper
    raise AttributeError(name)
