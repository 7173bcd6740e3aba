"""The Mixer's removal of delivered guaranteed-lane messages against a real nats-server: a
message a receiver gave back (NAKed) while no pull request waits must come back at its next
fetch, first, whatever the Mixer purged meanwhile.

nats-server's `consumer.purge` drops from the redelivery queue every entry below the
consumer's next sequence (still pending, not purged), so a NAKed message waited out ack_wait
(30 s) and came back behind newer ones: the given-back lane tests of test_mixer_lanes failed
when a purge pass fell between a Rack's stop (or kill) and its return. `LaneConsumers.purge`
defers a subject while a consumer of it holds messages and nobody pulls, and, whatever the
subject's fill, while a consumer of it has not acked past a message it NAKed (fluxrig_mixer.lanes).
"""

from __future__ import annotations

import pytest
from mixer_fixtures import *  # noqa: F401,F403  the `mixer` fixture

from fluxrig.wire import subjects as S

pytestmark = pytest.mark.timeout(60)

SUBJECT = "flux.msg.probe.gen.out"


async def _given_back(mixer, name: str):
    """A consumer that got five messages, acked two, NAKed the third and holds the other two,
    with no pull request left open (the fetch got its whole batch): a receiver gone away."""
    from nats.js.api import AckPolicy, ConsumerConfig

    js = mixer.js
    await js.add_consumer(
        S.STREAM_MSG,
        ConsumerConfig(
            name=name,
            durable_name=name,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            max_deliver=-1,
            filter_subjects=[SUBJECT],
        ),  # fmt: skip
    )
    for i in range(5):
        await js.publish(SUBJECT, f"m{i}".encode())
    psub = await js.pull_subscribe_bind(name, S.STREAM_MSG)
    msgs = await psub.fetch(5, timeout=5)
    assert [m.data for m in msgs] == [f"m{i}".encode() for i in range(5)]
    await msgs[0].ack_sync()
    await msgs[1].ack_sync()
    await msgs[2].nak()
    await mixer.nc.flush()
    return psub, msgs


async def test_a_purge_while_the_receiver_is_away_keeps_what_it_gave_back_first_in_line(mixer):
    psub, _held = await _given_back(mixer, "probe-away")
    lanes = mixer.controller.lanes
    info = await mixer.js.consumer_info(S.STREAM_MSG, "probe-away")
    assert info.num_ack_pending == 3 and info.num_waiting == 0, info
    await lanes.purge()
    try:
        back = await psub.fetch(1, timeout=3)
    except TimeoutError:
        pytest.fail("the NAKed message did not come back: the purge dropped it from the redelivery queue")
    assert back[0].data == b"m2" and back[0].metadata.num_delivered == 2
    # either rule holds it: the NAK advisory (if it came before the purge) or num_ack_pending
    assert lanes.stats["purges_deferred"] + lanes.stats["purges_held_for_naks"] >= 1, lanes.stats


async def test_the_deferred_purge_runs_once_the_receiver_settled(mixer):
    psub, held = await _given_back(mixer, "probe-back")
    lanes = mixer.controller.lanes
    await lanes.purge()
    purges = lanes.stats["purges"]
    for m in [*await psub.fetch(1, timeout=3), *held[3:]]:
        await m.ack_sync()
    await lanes.purge()
    assert lanes.stats["purges"] == purges + 1
    info = await mixer.js.stream_info(S.STREAM_MSG, subjects_filter=SUBJECT)
    assert not (info.state.subjects or {}).get(SUBJECT), info.state


async def test_a_nearly_full_subject_is_not_purged_past_a_message_given_back(tmp_path):
    """Room does not come before order: with the subject over PURGE_EAGER_RATIO of its quota,
    the num_ack_pending rule gives way, but the NAK advisory still holds the purge until the
    consumer acked past what it NAKed (issue 13: the hub-restart lane tests failed here)."""
    from mixer_fixtures import make_mixer, wait_for

    mixer = await make_mixer(tmp_path / "mixer", **{"snake.lane_max_msgs_per_subject": 8})
    try:
        psub, held = await _given_back(mixer, "probe-full")  # 5 of 8: over the eager ratio
        lanes = mixer.controller.lanes
        await wait_for(lambda: lanes.naked.get("probe-full") == 3, timeout=5, what="the NAK advisory")
        await lanes.purge()
        assert lanes.stats["purges_held_for_naks"] >= 1, lanes.stats
        try:
            back = await psub.fetch(1, timeout=3)
        except TimeoutError:
            pytest.fail("the NAKed message did not come back: a purge dropped it from the redelivery queue")
        assert back[0].data == b"m2" and back[0].metadata.num_delivered == 2
        for m in [*back, *held[3:]]:
            await m.ack_sync()
        await lanes.purge()
        assert "probe-full" not in lanes.naked  # acked past it: forgotten, the subject is purged
        info = await mixer.js.stream_info(S.STREAM_MSG, subjects_filter=SUBJECT)
        assert not (info.state.subjects or {}).get(SUBJECT), info.state
    finally:
        await mixer.stop()
