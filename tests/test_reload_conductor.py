"""A rebuilt conductor takes over the open tickets of the one it replaces (issue 18 item 4).

The switch scenario (scenarios/iso8583-switch.yaml) in front of a slow issuer host: requests
are in flight (tickets open, the host holding them) while the conductor's config changes and
the Rack reloads, some replies arriving during a swap. Every reply is matched and returned to
the acquirer with the issuer's answer (no 91 decline, no timeout, no reversal owed), on the
one link to the host.
"""

import asyncio

import iso8583
from helpers import free_port, running, scenario_from_yaml
from test_iso_authorizer import SPEC, request
from test_iso_switch import switch_text, wait_links

IN_FLIGHT = 200


class SlowIssuer:
    """An issuer host that answers every 0200 with an approving 0210 `delay` s after it came,
    spread `spread` s apart, so replies keep arriving over a while."""

    def __init__(self, delay: float, spread: float = 0.0):
        self.delay = delay
        self.spread = spread
        self.got: list[dict] = []
        self.conns = 0
        self.server = None

    async def start(self, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)

    async def _serve(self, r, w):
        self.conns += 1
        loop = asyncio.get_running_loop()
        try:
            while True:
                n = int.from_bytes(await r.readexactly(2), "big")
                doc, _ = iso8583.decode(await r.readexactly(n), SPEC)
                self.got.append(doc)
                at = loop.time() + self.delay + self.spread * len(self.got)
                loop.call_at(at, self._answer, w, doc)
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    @staticmethod
    def _answer(w, doc):
        reply = {k: v for k, v in doc.items() if k in ("7", "11", "37", "41", "2", "3", "4")}
        reply.update({"t": "0210", "39": "00", "38": "AUTH01"})
        body, _ = iso8583.encode(reply, SPEC)
        if not w.is_closing():
            w.write(len(body).to_bytes(2, "big") + bytes(body))

    def close(self):
        self.server.close()


async def read_replies(r, n: int, timeout: float = 15) -> list[dict]:
    out = []
    for _ in range(n):
        size = int.from_bytes(await asyncio.wait_for(r.readexactly(2), timeout), "big")
        doc, _ = iso8583.decode(await r.readexactly(size), SPEC)
        out.append(doc)
    return out


def changed(text: str, n: int) -> str:
    # the conductor's config changes (ttl), nothing else: only `switch` is rebuilt
    return text.replace("ttl: 10s", f"ttl: {10 + n}s").replace("version: 1.0.0", f"version: 1.0.{n}")


async def test_200_requests_in_flight_to_a_slow_host_survive_a_conductor_reload():
    port, a, b = free_port(), free_port(), free_port()
    host = SlowIssuer(delay=2.0)
    await host.start(a)
    text = switch_text(port, a, b)
    try:
        async with running(text) as sw:
            await wait_links(sw, 1)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"".join(request("0200", "%06d" % i) for i in range(1, IN_FLIGHT + 1)))
            for _ in range(500):
                if len(host.got) == IN_FLIGHT:
                    break
                await asyncio.sleep(0.01)
            assert len(host.got) == IN_FLIGHT  # every ticket is open, the host holds them all
            old = sw.gears["switch"]
            assert len(old.open) == IN_FLIGHT
            report = await sw.swap(scenario_from_yaml(changed(text, 1)))
            assert report.rebuilt == ["switch"]
            new = sw.gears["switch"]
            assert new is not old and not old.open
            assert len(new.open) + new.stats["matched"] == IN_FLIGHT  # taken over (a loaded box may be slow)
            replies = await read_replies(r, IN_FLIGHT)
            assert sorted(x["11"] for x in replies) == ["%06d" % i for i in range(1, IN_FLIGHT + 1)]
            assert all(x["t"] == "0210" and x["39"] == "00" for x in replies)  # none declined 91
            assert new.stats["matched"] >= IN_FLIGHT and new.stats["timeouts"] == 0
            assert not new.open
            await asyncio.sleep(0.3)
            assert len(host.got) == IN_FLIGHT  # no reversal owed: nothing was lost
            assert host.conns == 1
            w.close()
    finally:
        host.close()


async def test_replies_arriving_during_ten_conductor_reloads_are_all_matched():
    port, a, b = free_port(), free_port(), free_port()
    host = SlowIssuer(delay=0.3, spread=0.004)  # replies trickle in over ~0.8 s
    await host.start(a)
    text = switch_text(port, a, b)
    try:
        async with running(text) as sw:
            await wait_links(sw, 1)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"".join(request("0200", "%06d" % i) for i in range(1, IN_FLIGHT + 1)))
            reading = asyncio.create_task(read_replies(r, IN_FLIGHT))
            while len(host.got) < IN_FLIGHT // 4:
                await asyncio.sleep(0.005)
            for n in range(1, 11):  # while the replies arrive
                await sw.swap(scenario_from_yaml(changed(text, n)))
                await asyncio.sleep(0.05)
            replies = await reading
            assert sorted(x["11"] for x in replies) == ["%06d" % i for i in range(1, IN_FLIGHT + 1)]
            assert all(x["39"] == "00" for x in replies)
            sw_gear = sw.gears["switch"]
            assert sw_gear.stats["timeouts"] == 0 and not sw_gear.open
            assert host.conns == 1 and len(host.got) == IN_FLIGHT
            w.close()
    finally:
        host.close()


async def test_a_rolled_back_reload_leaves_the_tickets_with_the_running_conductor():
    import test_runtime  # noqa: F401  registers test_recorder

    from fluxrig.runtime.reload import ReloadError

    port, a, b = free_port(), free_port(), free_port()
    host = SlowIssuer(delay=1.0)
    await host.start(a)
    text = switch_text(port, a, b)
    try:
        async with running(text) as sw:
            await wait_links(sw, 1)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"".join(request("0200", "%06d" % i) for i in range(1, 51)))
            while len(host.got) < 50:
                await asyncio.sleep(0.01)
            old = sw.gears["switch"]
            failing = changed(text, 1).replace(
                "wires:", "  - {name: bad, type: test_recorder, config: {fail_start: true}}\nwires:", 1
            )
            try:
                await sw.swap(scenario_from_yaml(failing))
            except ReloadError:
                pass
            else:
                raise AssertionError("the swap should have been rolled back")
            assert sw.gears["switch"] is old and old._successor is None and old.reversals is not None
            replies = await read_replies(r, 50)
            assert sorted(x["11"] for x in replies) == ["%06d" % i for i in range(1, 51)]
            assert all(x["39"] == "00" for x in replies) and old.stats["timeouts"] == 0
            w.close()
    finally:
        host.close()
