"""Any-node correlation (issue 17 item 3), end to end: a real Mixer, three in-process Rack members
of group `pos` each running the switch (acquirer server, conductor, issuer client leg), and an
issuer written here that answers every request on ANOTHER member's leg than the one it came
on. Each member's conductor finds no ticket for such a reply, its `group_relay` hands it to the
other members over the Snake, and the member holding the ticket answers its acquirer. Without
the relay every transaction would end declined (ticket timeout).

Also item 5: each member keeps its own leg to the issuer (three connections at the issuer)."""

from __future__ import annotations

import asyncio

import pytest
from cluster_group import CrossLegIssuer
from group_fixtures import GroupRack, group_rack_config
from mixer_fixtures import make_mixer, wait_for

from fluxrig.tools.iso_load import run_load

pytestmark = [pytest.mark.mixer, pytest.mark.timeout(180)]

SWITCH = """
meta: {{name: pos-switch, version: "1"}}
racks:
  - {{group: pos, match: {{labels: {{role: pos}}}}}}
gears:
  - {{name: acquirer, type: io_iso8583, deploy: pos, config: {{mode: server, bind: "127.0.0.1:0", framing: len2_be}}}}
  - {{name: acq_decode, type: codec_iso8583, deploy: pos, config: {{direction: decode}}}}
  - name: switch
    type: conductor
    deploy: pos
    config:
      ttl: 3s
      routes: [{{name: issuer, destination: out_issuer, reversal: {{enabled: false}}}}]
  - {{name: iss_encode, type: codec_iso8583, deploy: pos, config: {{direction: encode}}}}
  - {{name: issuer, type: io_iso8583, deploy: pos,
     config: {{mode: client, connect: "127.0.0.1:{issuer}", framing: len2_be, idle_timeout: 0s}}}}
  - {{name: iss_decode, type: codec_iso8583, deploy: pos, config: {{direction: decode}}}}
  - name: triage
    type: router
    deploy: pos
    config:
      rules:
        - {{name: relay, match: {{field: meta.error.reason, in: [unmatched_reply]}}}}
        - {{name: decline, match: {{field: meta.error.reason, in: [timeout, link_lost, no_route, no_destination]}}}}
      default: other
  - {{name: relay, type: group_relay, deploy: pos, config: {{group: pos}}}}
  - {{name: decline, type: iso_responder, deploy: pos, config: {{default_code: "91", approved_codes: []}}}}
  - {{name: acq_encode, type: codec_iso8583, deploy: pos, config: {{direction: encode}}}}
  - {{name: problems, type: sink, deploy: pos, config: {{mode: "null"}}}}
wires:
  - {{from: acquirer.out, to: acq_decode.in}}
  - {{from: acq_decode.out, to: switch.in}}
  - {{from: switch.out_issuer, to: iss_encode.in}}
  - {{from: iss_encode.out, to: issuer.in}}
  - {{from: issuer.out, to: iss_decode.in}}
  - {{from: iss_decode.out, to: switch.in_reply}}
  - {{from: switch.error, to: triage.in}}
  - {{from: triage.out_relay, to: relay.in}}
  - {{from: relay.out, to: switch.in_reply}}
  - {{from: triage.out_decline, to: decline.in}}
  - {{from: triage.out_other, to: problems.in}}
  - {{from: decline.out, to: acq_encode.in}}
  - {{from: switch.out_response, to: acq_encode.in}}
  - {{from: acq_encode.out, to: acquirer.in}}
"""


@pytest.fixture
async def hub(tmp_path):
    m = await make_mixer(tmp_path / "mixer", **{"enrollment.auto_adopt": True})
    try:
        yield m
    finally:
        await m.stop()


async def _load(members, per_member: int, rate: float):
    ports = [m.rack.runtime.gears["acquirer"].endpoint.port for m in members]
    return await asyncio.gather(
        *(run_load(f"127.0.0.1:{p}", rate=rate, concurrency=16, duration=per_member / rate, timeout=10) for p in ports)
    )


async def test_a_reply_on_another_members_leg_is_matched_by_the_owner(tmp_path, hub):
    issuer = await CrossLegIssuer().start()
    members = [GroupRack(group_rack_config(tmp_path, f"pos-{i}", hub, {"role": "pos"})) for i in (1, 2, 3)]
    try:
        for m in members:
            await m.start()
        stored, _ = hub.scenarios.import_text(SWITCH.format(issuer=issuer.port))
        await hub.controller.activate_scenario(stored)
        for m in members:
            await wait_for(lambda m=m: m.rack.agent.applied_version == stored.version, timeout=30, what=f"{m.name}")
            assert m.rack.agent.apply_state == "applied", m.rack.agent.apply_reason
        # Item 5: every member holds its own leg to the host.
        await wait_for(lambda: len(issuer.legs) == 3, timeout=20, what="three issuer legs")

        # Baseline: the host answers on the leg each request came on.
        issuer.same_leg = True
        base = await _load(members, per_member=100, rate=50)
        assert all(r.answered == r.sent and r.mismatched == 0 for r in base), base
        assert issuer.crossed == 0

        # Every reply on another member's leg.
        issuer.same_leg = False
        network_before = issuer.network
        crossed = await _load(members, per_member=100, rate=50)
        for r in crossed:
            assert r.timeouts == 0 and r.mismatched == 0 and r.answered == r.sent, r
        # network management (the load's 0800s) is answered on its own link, everything else crossed
        own_leg = issuer.network - network_before
        assert issuer.crossed + own_leg >= sum(r.sent for r in crossed) - 3, (
            issuer.crossed,
            own_leg,
            [r.sent for r in crossed],
        )
        relays = [m.rack.runtime.gears["relay"].metrics() for m in members]
        switches = [m.rack.runtime.gears["switch"].metrics() for m in members]
        relayed = sum(r["relayed"] for r in relays)
        assert relayed >= issuer.crossed - 3, relays
        # No transaction was declined: the owner matched every relayed reply.
        assert sum(r.get("unowned", 0) for r in relays) <= 3 * (len(members) - 1) * relayed
        p99 = max(r.get("relay_p99_ms", 0) for r in relays)
        base_p99 = max(r.p99_ms for r in base)
        cross_p99 = max(r.p99_ms for r in crossed)
        print(f"relayed {relayed}, relay_p99_ms {p99}, acquirer p99 same-leg {base_p99} ms, cross-leg "
              f"{cross_p99} ms, switch stats {[s.get('matched') for s in switches]}")  # fmt: skip
    finally:
        for m in members:
            await m.stop()
        await issuer.stop()
