"""An issuer that is down for a long time (issue 16, "Issuer down for 2 minutes"): the owed
reversals wait (nothing sent, no attempt counted, the pump idle rather than spinning), then,
the issuer back, drain in order of age with never more than the window unanswered at once,
each with one first attempt (0400) and no repeat.

The real two minutes run behind the `chaos` marker (`make chaos-test`); `make test` runs the
same scenario with a 3 s outage."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import free_port, running
from test_iso_authorizer import request
from test_iso_switch import switch_text, wait_links
from test_saga import Issuer, _drain

WINDOW = 8
WAVES = 3  # the debt is owed in waves, so the queue holds reversals of different ages
PER_WAVE = 20
# The pump must wait, not spin, while no leg is up: the whole process (switch, issuer, test)
# may use at most this share of one core over the outage.
MAX_CPU_SHARE_WHILE_DOWN = 0.25


async def _owe_in_waves(port: int, issuer: Issuer) -> tuple[list[str], object]:
    """WAVES waves of PER_WAVE requests the issuer approves and never answers, ~0.1 s apart;
    the issuer is taken away after the last one, before any deadline (the switch's TTL is
    longer), so no reversal reaches it: they all wait, the first wave's the oldest."""
    _r, w = await asyncio.open_connection("127.0.0.1", port)
    stans = []
    for wave in range(WAVES):
        batch = [f"{wave * PER_WAVE + i + 1:06d}" for i in range(PER_WAVE)]
        stans += batch
        w.write(b"".join(request("0200", s) for s in batch))
        for _ in range(300):
            if len(issuer.ledger) >= len(stans):
                break
            await asyncio.sleep(0.01)
        assert len(issuer.ledger) >= len(stans), f"the issuer saw {len(issuer.ledger)} of {len(stans)} requests"
        await asyncio.sleep(0.1)
    await issuer.stop()
    return stans, w


async def _outage(tmp_path, outage_s: float) -> None:
    port, a, b = free_port(), free_port(), free_port()
    issuer = Issuer(a, drop=1.0)
    await issuer.start()
    text = switch_text(port, a, b, ttl="3s", saga_dir=str(tmp_path / "saga"), backoff="1s")
    text = text.replace("window: 32", f"window: {WINDOW}")
    assert f"window: {WINDOW}" in text
    async with running(text) as sw:
        gear = sw.gears["switch"]
        await wait_links(sw, 1)
        stans, w = await _owe_in_waves(port, issuer)
        n = len(stans)
        for _ in range(300):
            if gear.metrics().get("saf_open") == n:
                break
            await asyncio.sleep(0.05)
        assert gear.metrics().get("saf_open") == n, gear.metrics()
        owed_order = [s.fields["90"][4:10] for s in sorted(gear.reversals.queues["out_issuer_a"].sagas.values(),
                                                          key=lambda s: s.order)]  # fmt: skip
        assert owed_order == stans  # owed in the order the requests were sent
        # -- the outage: nothing sent, nothing counted, the pump idle ----------------------------
        t0, cpu0 = time.monotonic(), time.process_time()
        checks = 0
        while time.monotonic() - t0 < outage_s:
            await asyncio.sleep(min(5.0, outage_s / 3))
            m = gear.metrics()
            assert m["saf_open"] == n and m["saf.out_issuer_a.sent"] == 0 and m["saf_parked"] == 0, m
            checks += 1
        cpu_share = (time.process_time() - cpu0) / (time.monotonic() - t0)
        m = gear.metrics()
        assert checks >= 3 and m["saf.out_issuer_a.oldest_age_s"] >= outage_s, m
        assert cpu_share <= MAX_CPU_SHARE_WHILE_DOWN, f"{cpu_share:.0%} of a core while the issuer was down"
        assert not issuer.reversals  # the issuer never saw one while it was down
        # -- back: the queue drains oldest first within the window ------------------------------
        back = Issuer(a, answer_after=0.05)
        back.ledger = issuer.ledger
        await back.start()
        try:
            m = await _drain(sw, timeout=60)
        finally:
            w.close()
            await back.stop()
    assert m["saf_answered"] == n and m["saf_parked"] == 0, m
    assert back.most_unanswered <= WINDOW, back.most_unanswered
    firsts = [rv["original"][4:10] for rv in back.reversals if rv["mti"] == "0400"]
    assert firsts == owed_order, "first attempts out of the order of age"
    assert not [rv for rv in back.reversals if rv["mti"] == "0401"]  # no attempt was counted while down
    assert all(entry["reversals"] == ["0400"] for entry in issuer.ledger.values())  # each approval reversed once


@pytest.mark.timeout(120)
async def test_reversals_wait_out_a_short_issuer_outage_and_drain_oldest_first(tmp_path):
    await _outage(tmp_path, 3.0)


@pytest.mark.chaos
@pytest.mark.timeout(400)
async def test_reversals_wait_out_a_two_minute_issuer_outage_and_drain_oldest_first(tmp_path):
    await _outage(tmp_path, 120.0)
