"""Version of the fluxrig-mixer distribution."""

__version__ = "0.1.0"
