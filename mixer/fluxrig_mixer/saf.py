"""The reversals a joined Rack owes, through the Mixer: `saf list|show|retry|park` (issue 16 item 4).

`SafClient(commands).ask(rack, op, saga=..., gear=..., why=..., actor=...)` signs a `saf`
command (fluxrig.ctrl: the cluster key, the Rack's id, a fresh nonce, `ttl` seconds of validity;
args `op`, `saga`, `gear`, the reason `why`), sends it as a NATS request on
`flux.ctrl.<rack>.saf` and waits up to `wait` seconds for the Rack's SafAnswer on the reply
subject (a Rack's bus user may answer the requests it receives: `allow_responses`). The Rack
verifies the command like a kill (pinned key, its rack id, expiry, nonce kept on disk: a retry
or park captured on the bus and sent again is refused as replayed), then runs the verb on its
running conductors (fluxrig/saga/ops.py). PANs are masked on the Rack, before they leave it.

Every command sent is recorded in `rack_events` as `ctrl.saf` with the op, the reversal id, the
reason, the nonce and `by=<actor>`, the API caller (the same audit trail as the kill switch).

Raises: RackNotFound (404), CommandNotAllowed (409: a removed Rack), SnakeUnavailable (503: the
Mixer's bus connection is down, nothing was sent), RackNoAnswer (504: the Rack is not connected
or did not answer within `wait`), fluxrig.ctrl.CommandRefused (400: a bad op, id or ttl).
"""

from __future__ import annotations

import logging

from fluxrig import ctrl as C
from fluxrig.errors import FluxError
from fluxrig.wire import subjects as S
from fluxrig.wire.messages import SafAnswer, WireError
from fluxrig.wire.vocab import RackStatus, SafOp

from .commands import CommandNotAllowed, CommandSender, SnakeUnavailable

__all__ = ["SafClient", "RackNoAnswer", "DEFAULT_SAF_WAIT_S", "MAX_SAF_WAIT_S", "STATE_CHANGING"]

log = logging.getLogger("fluxrig.mixer.saf")

DEFAULT_SAF_WAIT_S = 5.0
MAX_SAF_WAIT_S = 30.0
STATE_CHANGING = (SafOp.RETRY, SafOp.PARK)


class RackNoAnswer(FluxError):
    """The Rack (`rack`) did not answer a `saf` command within `wait` seconds (offline, or busy)."""

    def __init__(self, rack: str, wait: float, why: str = ""):
        self.rack = rack
        self.wait = wait
        super().__init__(
            f"rack {rack} did not answer within {wait:g}s{': ' + why if why else ''}; "
            "is it connected (fluxrig admin racks show)? A retry or park may still take effect "
            "while the command is valid"
        )


class SafClient:
    """Signs, sends and awaits `saf` commands (see the module docstring)."""

    def __init__(self, commands: CommandSender):
        self.registry = commands.registry
        self.commands = commands
        self.key = commands.key
        self.bus = commands.bus

    async def _audit(self, rack, command: C.Command, actor: str, sent: str = "") -> None:
        detail = (
            f"by={actor or 'unknown'} op={command.op} saga={command.saga or '-'} reason={command.reason!r} "
            f"nonce={command.nonce.hex()}" + (f" gear={command.gear}" if command.gear else "") + sent
        )
        await self.commands.record(rack, f"ctrl.{command.cmd}", detail)

    async def ask(
        self,
        rack_key: str,
        op: str,
        *,
        saga: str = "",
        gear: str = "",
        why: str = "",
        ttl: float = C.DEFAULT_COMMAND_TTL_S,
        wait: float = DEFAULT_SAF_WAIT_S,
        actor: str = "api",
    ) -> dict:
        """{"status": "applied" | "refused", "rack", "command", "answer": SafAnswer as a dict}."""
        rack = self.registry.get(rack_key)
        if rack.status == RackStatus.REMOVED:
            raise CommandNotAllowed(rack.name, rack.status)
        command = C.new_command(C.CMD_SAF, rack.rack_id, rack.name, gear=gear, op=op, saga=saga, reason=why, ttl=ttl)
        data = C.sign_command(self.key, command)
        bus = self.bus
        if bus is None or not bus.is_connected:
            await self._audit(rack, command, actor, " not-sent=bus-down")
            raise SnakeUnavailable()
        wait = max(0.1, min(wait, MAX_SAF_WAIT_S))
        await self._audit(rack, command, actor)
        if op in STATE_CHANGING:
            log.warning("saf %s of %s sent to rack %s by %s (%s)", op, saga, rack.name, actor, why or "no reason given")
        try:
            msg = await bus.request(S.ctrl(rack.name, C.CMD_SAF), data, timeout=wait)
        except TimeoutError as exc:
            raise RackNoAnswer(rack.name, wait) from exc
        except Exception as exc:  # nats NoRespondersError: nobody subscribes to the Rack's subject
            if type(exc).__name__ == "NoRespondersError":
                raise RackNoAnswer(rack.name, wait, "it is not connected to the Snake") from None
            raise SnakeUnavailable(str(exc)) from None
        try:
            answer = SafAnswer.decode(msg.data)
        except WireError as exc:
            raise RackNoAnswer(rack.name, wait, f"its answer is not a saf answer ({exc})") from None
        if answer.nonce and answer.nonce != command.nonce.hex():
            raise RackNoAnswer(rack.name, wait, "it answered another command")
        status = "applied" if answer.ok else "refused"
        return {"status": status, "rack": rack.name, "command": command.summary(), "answer": answer.to_dict()}
