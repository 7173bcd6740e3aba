"""Small helpers shared by the CLI commands."""

from __future__ import annotations

import sys

from ..config import Config, load_config
from ..errors import FluxError

__all__ = ["config_or_report"]


def config_or_report(path: str | None) -> Config | None:
    """The loaded configuration, or None after printing the error (the caller exits 2)."""
    try:
        return load_config(path)
    except FluxError as exc:
        print(f"fluxrig: configuration error: {exc}", file=sys.stderr)
        return None
