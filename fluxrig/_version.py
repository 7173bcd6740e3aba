"""Version of the fluxrig distribution; commit and build date are stamped by packaging."""

__version__ = "0.1.0"
