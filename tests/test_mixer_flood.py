"""Hellos and heartbeats are rate-limited per sender before any work, on a real Mixer (issue 13
item 5; ratelimit.py through controller.attach): a flood under one claimed name or one Rack's
heartbeat subject is dropped past its burst and counted in /metrics, an oversized Hello is
dropped before it is decoded, and another sender is still served meanwhile."""

from __future__ import annotations

import httpx
import pytest
from fluxrig_mixer.ratelimit import HEARTBEAT_BURST, HELLO_BURST, MAX_HELLO_BYTES
from mixer_fixtures import *  # noqa: F401,F403 (the mixer fixture)
from mixer_fixtures import wait_for

from fluxrig.wire import identity as I
from fluxrig.wire import messages as W
from fluxrig.wire import subjects as S

pytestmark = [pytest.mark.mixer, pytest.mark.timeout(120)]

FLOOD = 60


def hello(name: str) -> bytes:
    _sk, pk = W.new_reply_keypair()
    seed = I.new_user_seed()
    return W.Hello("frt_nosuch_x", name, pk, "flood-host", nkey=I.public_key(seed), nkey_sig=I.prove(seed, pk)).encode()


async def test_a_flood_from_one_sender_is_dropped_past_its_burst_and_counted(mixer):
    c = mixer.controller.counters
    answered0 = c["hello_denied"] + c["hello_ok"] + c["hello_bad"]
    one = hello("flood")
    for _ in range(FLOOD):  # no reply subject: a flood does not wait for answers
        await mixer.nc.publish(S.HELLO, one)
    await mixer.nc.publish(S.HELLO, b"\xa0" * (MAX_HELLO_BYTES + 1))
    await mixer.nc.flush()
    await wait_for(lambda: mixer.controller.dropped()["hello"] >= FLOOD - HELLO_BURST - 1, 10, what="the flood dropped")
    await wait_for(lambda: mixer.controller.dropped()["hello_oversized"] == 1, 10, what="the oversized Hello dropped")
    answered = lambda: c["hello_denied"] + c["hello_ok"] + c["hello_bad"] - answered0  # noqa: E731
    await wait_for(lambda: answered() >= HELLO_BURST, 10, what="the burst served")
    assert answered() <= HELLO_BURST + 1, answered()  # the rest cost nothing past the limiter
    # Another name is a sender of its own: served at once, while the first is still limited.
    reply = await mixer.nc.request(S.HELLO, hello("someone-else"), timeout=10)
    assert "unknown enrollment token" in W.HelloReply.decode(reply.data).message

    beats0 = c["heartbeats"] + c["heartbeat_unknown"]
    for _ in range(FLOOD):
        await mixer.nc.publish(S.heartbeat("ghost"), b"{}")
    await mixer.nc.flush()
    await wait_for(
        lambda: mixer.controller.dropped()["heartbeat"] >= FLOOD - HEARTBEAT_BURST - 2,
        10,
        what="the heartbeat flood dropped",
    )
    assert c["heartbeats"] + c["heartbeat_unknown"] - beats0 <= HEARTBEAT_BURST + 2

    async with httpx.AsyncClient(base_url=mixer.api_url, headers={"Authorization": f"Bearer {mixer.api_token}"}) as api:
        text = (await api.get("/metrics")).text
    dropped = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("fluxrig_mixer_dropped_total{")
    }
    assert dropped["hello"] >= FLOOD - HELLO_BURST - 1 and dropped["hello_oversized"] == 1, dropped
    assert dropped["heartbeat"] >= FLOOD - HEARTBEAT_BURST - 2 and dropped["heartbeat_oversized"] == 0, dropped
