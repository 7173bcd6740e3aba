"""fluxrig-mixer: the control plane of fluxrig.

Registry of Racks (DuckDB), enrollment and signed passports, scenario distribution,
telemetry ingest into DuckDB, the control API (FastAPI, port 8090), all around a supervised
nats-server child (the Snake). Entry point: `fluxrig-mixer serve -c fluxrig-mixer.toml`.
Importing this package has no side effects; `fluxrig_mixer.app.Mixer` wires the parts.
"""

from ._version import __version__

__all__ = ["__version__"]
