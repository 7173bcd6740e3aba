"""A dependency-free sd_notify client: READY, RELOADING, STOPPING, WATCHDOG, STATUS.

A no-op when `NOTIFY_SOCKET` is unset (not under systemd), so callers never branch on it.
`watchdog_interval()` returns half of `WATCHDOG_USEC` (the period systemd recommends for
keep-alives) or None. systemd sets `WATCHDOG_PID` to the service's main PID; in the frozen
one-file binary that is the PyInstaller bootloader and Python runs in its child, so there the
parent's PID also counts as ours (the unit sets NotifyAccess=all for the same reason).
"""

from __future__ import annotations

import os
import socket
import sys

__all__ = ["notify", "ready", "stopping", "reloading", "watchdog", "status", "watchdog_interval"]


def notify(state: str) -> bool:
    """Send one datagram to systemd; True if it was sent."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
        return True
    except OSError:
        return False


def ready(status_text: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status_text}" if status_text else ""))


def stopping() -> bool:
    return notify("STOPPING=1")


def reloading() -> bool:
    return notify("RELOADING=1")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def _own_pids() -> tuple[str, ...]:
    if getattr(sys, "frozen", False):
        return str(os.getpid()), str(os.getppid())
    return (str(os.getpid()),)


def watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid not in _own_pids()):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
