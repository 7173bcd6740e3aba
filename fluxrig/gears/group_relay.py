"""`group_relay`: hands what this member of a Rack group cannot match to the other members.

Job (issue 17 item 3, any-node correlation). Each member of a group runs its own conductor with
its own tickets. A host may answer on another leg than the one the request went out on, and in
a group that leg can belong to another member: that member's conductor finds no ticket and
emits the reply on `error` with `error.reason=unmatched_reply`. Wire those (a router rule) into
this gear's `in`: it publishes the reply once on the group's relay subject
`flux.grp.<group>.<gear>.relay` (core NATS: fire and forget, nothing stored), every other member's
`group_relay` emits it on `out`, wired to its conductor's `in_reply`, and the member holding the
ticket matches it (a late reply there owes its reversal there). A relayed reply that is unmatched
again (no member holds it: truly late or unknown) is not relayed a second time: it is counted
(`unowned`) and dropped, so nothing loops.

Chosen over tickets in KV: a KV write per request (the common case, answered on its own leg)
would cost every transaction a round trip to the Snake; relaying costs only the rare reply
that lands on the wrong member, one core publish and N-1 lookups. Measured:
`relay_p99_ms` (publish at the member that got the reply to emit at the others, same clock on
one host; bench/cluster.py and tests/test_rack_group_relay.py give end-to-end figures).

Config: `group` (required: the group whose members relay to each other, the gear's `deploy`),
`max_bytes` (a relayed reply above it is dropped and counted, `too_large`). Needs a Rack joined
to a Mixer (the bus); standalone it refuses to start, saying so. Meta keys it sets on relayed
messages: `group.relay.from` (the Rack that got the reply), `group.relay.ts` (ns).
"""

from __future__ import annotations

import time

from ..errors import GearError
from ..msg import FluxMsg
from ..runtime.gear import Gear, Manifest
from ..runtime.registry import register
from ..wire import meta as M
from ..wire import subjects as S

__all__ = ["GroupRelayGear", "RELAY_FROM", "RELAY_TS", "DEFAULT_MAX_BYTES", "LATENCY_WINDOW"]

RELAY_FROM = M.GROUP_RELAY_FROM
RELAY_TS = M.GROUP_RELAY_TS
DEFAULT_MAX_BYTES = 65536
#: Latencies kept for `relay_p99_ms` (a ring: bounded memory).
LATENCY_WINDOW = 10_000

SCHEMA = {
    "type": "object",
    "properties": {
        "group": {"type": "string", "description": "the Rack group whose members relay to each other"},
        "max_bytes": {"type": "integer", "minimum": 256, "maximum": 2 * 1024 * 1024, "default": DEFAULT_MAX_BYTES,
                      "description": "largest relayed message (CBOR bytes); larger ones are dropped and counted"},
    },
    "required": ["group"],
    "additionalProperties": False,
}  # fmt: skip

_ERROR_KEYS = (M.ERROR_REASON, M.ERROR_GEAR, M.ERROR_DETAIL)


@register
class GroupRelayGear(Gear):
    MANIFEST = Manifest(
        "group_relay",
        "Relays replies this group member cannot match to the other members (any-node correlation)",
        category="flow",
        schema=SCHEMA,
    )

    def __init__(self, name, config, ctx):
        super().__init__(name, config, ctx)
        self.subject = S.group_relay(config["group"], name)
        self.max_bytes = int(config["max_bytes"])
        self.stats = dict.fromkeys(("relayed", "received", "emitted", "unowned", "too_large", "not_sent"), 0)
        self._lat: list[float] = []
        self._lat_i = 0
        self._bus = None

    async def start(self) -> None:
        bus = self.ctx.bus
        if bus is None or not hasattr(bus, "relay_subscribe"):
            raise GearError("no_bus", f"{self.name}: group_relay needs a Rack joined to a Mixer (snake.url)")
        self._bus = bus
        bus.relay_subscribe(self.subject, self._on_relay)

    async def stop(self) -> None:
        if self._bus is not None:
            self._bus.relay_unsubscribe(self.subject)
            self._bus = None

    async def process(self, port: str, msg: FluxMsg) -> None:
        if msg.meta.get(RELAY_FROM):
            self.stats["unowned"] += 1  # relayed to us and unmatched here too: nobody holds it
            return
        for k in _ERROR_KEYS:
            msg.meta.pop(k, None)
        msg.meta[RELAY_FROM] = self.ctx.rack_name
        msg.meta[RELAY_TS] = str(time.time_ns())
        data = msg.to_cbor()
        if len(data) > self.max_bytes:
            self.stats["too_large"] += 1
            return
        if self._bus is None or not await self._bus.relay_publish(self.subject, data):
            self.stats["not_sent"] += 1  # the Snake is away: the owner's ticket times out as usual
            return
        self.stats["relayed"] += 1

    async def _on_relay(self, nats_msg) -> None:
        try:
            msg = FluxMsg.from_cbor(nats_msg.data)
        except Exception:
            self.counters.errors += 1
            return
        if msg.meta.get(RELAY_FROM) == self.ctx.rack_name:
            return  # our own publication
        self.stats["received"] += 1
        try:
            ts = int(msg.meta.get(RELAY_TS, "0"))
        except ValueError:
            ts = 0
        try:
            await self.emit("out", msg)
        except Exception as exc:  # noqa: BLE001 (a subscription callback must not raise)
            self.counters.errors += 1
            self.log.warning("%s: relayed message not handled: %s", self.name, exc)
            return
        self.stats["emitted"] += 1
        if ts:
            self._note((time.time_ns() - ts) / 1e6)

    def _note(self, ms: float) -> None:
        if len(self._lat) < LATENCY_WINDOW:
            self._lat.append(ms)
        else:
            self._lat[self._lat_i] = ms
            self._lat_i = (self._lat_i + 1) % LATENCY_WINDOW

    def metrics(self) -> dict:
        out = super().metrics()
        out.update(self.stats)
        if self._lat:
            lat = sorted(self._lat)
            out["relay_p50_ms"] = round(lat[len(lat) // 2], 3)
            out["relay_p99_ms"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3)
        return out
