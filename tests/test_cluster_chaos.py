"""Randomized failures of a 3-node Mixer cluster under a Rack's guaranteed traffic (issue 14):
`make test-cluster-chaos`, not `make test`.

One cluster, one Rack publishing numbered guaranteed-lane messages (each retried under its
Nats-Msg-Id until acknowledged). CLUSTER_CHAOS_RUNS runs (default 10; CLUSTER_CHAOS_SEED fixes
the draw): each picks a node and a fault at random,

  kill9    SIGKILL of the whole node (Mixer and nats-server), restarted after 0-3 s
  sigstop  SIGSTOP of both for 1-6 s, then SIGCONT (a paused node: its peers see it silent,
           it wakes up behind)

then waits until the node answers again and every stream's replicas are current on every node,
and records how long the Rack's publishing stalled. Checked at the end: no acknowledged write
lost (the acked sequence numbers contiguous from the first, each stored: count and last
sequence), none stored twice, and no diverging state (every node reports the same messages,
first and last sequence for each stream). One JSON line on stdout.

Without the shared registry (issue 14 item 2) the Rack's own node is never the one hit (its
identity exists only there); with it, any node is. Route cuts (a partitioned node) are not in
the matrix yet.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import pytest
from cluster_fixtures import (
    SHARED_STATE,
    GuaranteedSender,
    MixerCluster,
    cluster_status,
    enroll_rack,
    streams_ready,
)
from mixer_fixtures import wait_for

from fluxrig.wire import subjects as S

RUNS = int(os.environ.get("CLUSTER_CHAOS_RUNS", "10"))
SEED = int(os.environ.get("CLUSTER_CHAOS_SEED", str(int(time.time()))))
STALL_LIMIT_S = 60.0  # a run whose fault stalls the Rack's publishing longer fails
CATCH_UP_S = 120.0

pytestmark = [pytest.mark.chaos, pytest.mark.cluster_chaos, pytest.mark.timeout(300 + 120 * RUNS)]


async def _until(pred, timeout: float, what: str) -> None:
    await wait_for(lambda: asyncio.to_thread(pred), timeout, interval=0.2, what=what)


def test_randomized_kill9_and_sigstop_runs(tmp_path):
    enroll = "auto_adopt = true\nfirst_token_uses = 0\n"
    with MixerCluster(
        tmp_path / "c", 3, enrollment_toml=enroll, snake_toml="lane_max_msgs_per_subject = 0", route_password=True
    ) as c:
        result = asyncio.run(_chaos(tmp_path, c))
    print(json.dumps(result))
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["diverged"] == 0, result
    assert result["runs"] == RUNS


async def _chaos(tmp_path, c: MixerCluster) -> dict:
    rng = random.Random(SEED)
    for n in c.nodes:
        await _until(lambda n=n: streams_ready(n), 60, f"R3 streams on {n.name}")
    home = c.nodes[0]
    agent = await enroll_rack(tmp_path, home.enrollment_bundle())
    sender = GuaranteedSender(agent, S.msg(agent.rack_name, "out", "out"))
    faults = {"kill9": 0, "sigstop": 0}
    stalls = []
    try:
        await sender.wait_more(20, 30)
        for run in range(RUNS):
            candidates = c.nodes if SHARED_STATE else [n for n in c.nodes if n is not home]
            node, fault = rng.choice(candidates), rng.choice(("kill9", "sigstop"))
            faults[fault] += 1
            t0 = time.monotonic()
            if fault == "kill9":
                node.kill()
                await asyncio.sleep(rng.uniform(0, 3))
                node.start()
                await asyncio.to_thread(node.wait_ready)
            else:
                node.pause()
                await asyncio.sleep(rng.uniform(1, 6))
                node.resume()
            await wait_for(lambda t0=t0: sender.next_ack_after(t0) is not None, STALL_LIMIT_S, what="an ack")
            stalls.append(sender.next_ack_after(t0) - t0)
            for n in c.nodes:
                await _until(lambda n=n: streams_ready(n), CATCH_UP_S, f"run {run}: {n.name} current")
        await sender.wait_more(10, 30)
    finally:
        await sender.stop()
        await agent.stop()
        await agent.applied.stop()
    acked = list(sender.acks)
    await _until(lambda: all(streams_ready(n) for n in c.nodes), CATCH_UP_S, "all current at the end")
    states = [
        {k: (v["messages"], v["first_seq"], v["last_seq"]) for k, v in cluster_status(n)["streams"].items()}
        for n in c.nodes
    ]
    msg = [s[S.STREAM_MSG] for s in states]
    expected = set(range(acked[0], acked[0] + len(acked)))
    return {
        "suite": "cluster_chaos",
        "runs": RUNS,
        "seed": SEED,
        **faults,
        "acked": len(acked),
        "lost": len(expected - set(acked)) + sum(1 for m in msg if m[0] != len(acked) or m[2] != acked[-1]),
        "duplicated": len(acked) - len(set(acked)),
        "diverged": int(any(s != states[0] for s in states)),
        "max_stall_s": round(max(stalls), 2),
        "shared_registry": SHARED_STATE,
        "route_cuts": 0,
    }
