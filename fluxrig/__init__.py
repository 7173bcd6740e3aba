"""fluxrig: the Rack, a protocol patchbay for mission-critical traffic (see README.md)."""

from ._version import __version__

__all__ = ["__version__"]
