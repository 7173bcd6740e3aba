"""The in-Rack control bus: link events (`link.<gear>`: conn.up / conn.down) and commands
to gears (`<gear>`: conn.close, ...). Commands are small dicts `{"cmd": ..., "args": {...}}`.

Delivery is in memory and synchronous to callbacks; a callback must not block. When the Rack
is joined to the Snake, the agent relays `flux.ctrl.<rack>.>` commands into this bus after
verifying their signatures, so gears never see unsigned remote commands.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable

from ..wire.meta import link_topic

__all__ = ["ControlBus", "LINK_TOPIC_PREFIX"]

LINK_TOPIC_PREFIX = link_topic("")

log = logging.getLogger("fluxrig.control")


class ControlBus:
    def __init__(self):
        self._subs: dict[str, list[Callable[[dict], None]]] = defaultdict(list)
        self._last: dict[str, dict] = {}

    def subscribe(self, subject: str, callback: Callable[[dict], None], replay_last: bool = True) -> Callable[[], None]:
        """Call `callback(cmd)` for each command on `subject`; returns an unsubscribe function.

        Link subjects are state, not events: a late subscriber gets the last one replayed.
        """
        self._subs[subject].append(callback)
        if replay_last and subject in self._last:
            callback(self._last[subject])

        def unsubscribe() -> None:
            try:
                self._subs[subject].remove(callback)
            except ValueError:
                pass

        return unsubscribe

    def publish(self, subject: str, cmd: dict) -> int:
        """Deliver to every subscriber; returns how many received it."""
        if subject.startswith(LINK_TOPIC_PREFIX):  # the last link event is kept for late subscribers
            self._last[subject] = cmd
        n = 0
        for cb in list(self._subs.get(subject, ())):
            try:
                cb(cmd)
                n += 1
            except Exception:  # one broken subscriber must not starve the others
                log.exception("control subscriber on %s failed for %r", subject, cmd.get("cmd"))
        return n
