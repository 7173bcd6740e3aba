"""Address predicates shared by the Rack and the Mixer (sans-IO: no lookups, no sockets)."""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback"]


def is_loopback(host: str) -> bool:
    """True for a loopback literal (127.0.0.0/8, ::1) or "localhost". A name is never resolved:
    deciding "this stays on the machine" from DNS would let a resolver change the answer."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
