"""kv.py and lease.py against a real 3-node nats-server cluster (R3 buckets) and a single
node (R1): compare-and-set conflicts, a partitioned node that cannot write and converges on
rejoin, a lease taken over within its ttl after its holder dies."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from fluxrig_mixer.kv import Change, StateConflict, StateUnavailable, follow, open_buckets
from fluxrig_mixer.lease import Lease, LeaseLost
from kv_nats import NatsCluster

pytestmark = [pytest.mark.mixer, pytest.mark.timeout(300)]


@pytest.fixture
async def cluster(tmp_path):
    c = NatsCluster(tmp_path, 3)
    await c.start_all()
    yield c
    await c.stop()


async def _connect(url: str):
    return await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=2)


async def _open(nc, replicas: int = 3, timeout: float = 30.0):
    """open_buckets, retried while a young cluster has no meta leader or placement yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await open_buckets(nc.jetstream(), replicas=replicas)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


async def test_two_nodes_writing_the_same_revision_one_wins_one_conflicts(cluster):
    ncs = [await _connect(u) for u in cluster.urls[:2]]
    try:
        a = await _open(ncs[0])
        b = await _open(ncs[1])
        rev = await a.racks.create("r1", {"status": "pending", "n": 0})
        with pytest.raises(StateConflict):
            await b.racks.create("r1", {"status": "pending", "n": 99})
        seen = await b.racks.get("r1")
        assert seen.revision == rev and seen.value["n"] == 0
        results = await asyncio.gather(
            a.racks.update("r1", {"status": "active", "by": "a"}, rev),
            b.racks.update("r1", {"status": "suspended", "by": "b"}, rev),
            return_exceptions=True,
        )
        wins = [r for r in results if isinstance(r, int)]
        losses = [r for r in results if isinstance(r, StateConflict)]
        assert len(wins) == 1 and len(losses) == 1, results
        final = await a.racks.get("r1")
        assert final.revision == wins[0] and final.value["by"] in ("a", "b")
        # A stale revision never wins, however many try (the 2022 bug of institutional.md §1.2).
        stale = await asyncio.gather(*(b.racks.update("r1", {"x": i}, rev) for i in range(50)), return_exceptions=True)
        assert all(isinstance(s, StateConflict) for s in stale)
        # cas() merges instead: 12 concurrent increments from two nodes, none lost.
        await a.racks.create("counter", {"n": 0})

        def inc(v):
            return {"n": v["n"] + 1}

        await asyncio.gather(*(x.racks.cas("counter", inc) for x in (a, b) for _ in range(6)))
        assert (await b.racks.get("counter")).value["n"] == 12
    finally:
        for nc in ncs:
            await nc.close()


async def test_a_partitioned_node_cannot_write_and_converges_on_rejoin(cluster):
    ncs = [await _connect(u) for u in cluster.urls]
    try:
        bs = [await _open(nc) for nc in ncs]
        rev = await bs[0].racks.create("r1", {"v": 1})
        seen: dict[str, Change] = {}

        async def on_batch(changes, initial):
            for ch in changes:
                seen[ch.key] = ch

        ready = asyncio.Event()
        task = asyncio.get_running_loop().create_task(follow(bs[2].racks, on_batch, ready))
        await asyncio.wait_for(ready.wait(), 10)
        # Acked by a quorum (2 of 3): node 2's replica may apply it a moment later, and its
        # follower's first snapshot may come before that (the fresh-clone CI at 72cdee5 saw it).
        deadline = time.monotonic() + 10
        while "r1" not in seen and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert seen["r1"].value == {"v": 1}
        cluster.cut(2)
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        with pytest.raises(StateUnavailable):
            await bs[2].racks.update("r1", {"v": "minority"}, rev)
        assert time.monotonic() - t0 < 5
        # The majority goes on (a new stream leader if node 2 led it).
        deadline = time.monotonic() + 15
        while True:
            try:
                rev = await bs[0].racks.update("r1", {"v": 2}, rev)
                break
            except StateUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.3)
        await bs[1].racks.create("r2", {"v": "while-cut"})
        cluster.heal(2)
        got = None
        deadline = time.monotonic() + 30
        while not (seen.get("r1") and seen["r1"].value == {"v": 2} and "r2" in seen):
            assert time.monotonic() < deadline, f"node 2 did not converge: {seen}"
            await asyncio.sleep(0.2)
        assert seen["r1"].revision == rev
        # Nothing the minority tried exists anywhere.
        for b in bs:
            # Reads converge (a rejoined node that led the stream may answer stale until it
            # learns of the new leader: reads are not linearizable, writes are fenced).
            while True:
                try:
                    got = await b.racks.get("r1")
                    if got.value == {"v": 2}:
                        break
                except StateUnavailable:
                    pass
                assert time.monotonic() < deadline, f"read still {got.value if got else None}"
                await asyncio.sleep(0.3)
        task.cancel()
    finally:
        for nc in ncs:
            await nc.close()


async def test_a_lease_is_held_once_and_taken_over_within_its_ttl(cluster):
    ncs = [await _connect(u) for u in cluster.urls]
    try:
        bs = [await _open(nc) for nc in ncs]
        leases = [Lease(b.leases, "sweep", f"node-{i}", ttl=2.0) for i, b in enumerate(bs)]
        for lease in leases:
            lease.start()
        deadline = time.monotonic() + 10
        while sum(x.held for x in leases) != 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(3.0)  # renewals keep it where it is, never two holders
        holders = [i for i, x in enumerate(leases) if x.held]
        assert len(holders) == 1
        h = holders[0]
        fence = await leases[h].check()
        assert fence == leases[h].revision
        others = [i for i in range(3) if i != h]
        with pytest.raises(LeaseLost):
            await leases[others[0]].check()
        # The holder dies without a word (its process is gone: no renewal, no release).
        await leases[h].stop(release=False)
        t0 = time.monotonic()
        while not any(leases[i].held for i in others):
            assert time.monotonic() - t0 < 5.0, "no takeover within 5 s"
            await asyncio.sleep(0.05)
        takeover = time.monotonic() - t0
        assert takeover <= 2.0 + 1.5, takeover
        new = [i for i in others if leases[i].held][0]
        # The old holder's fencing revision is stale now: it can never renew.
        leases[h].revision = fence
        assert not await leases[h].renew()
        # A clean stop releases the key: the third node takes over at once.
        last = [i for i in others if i != new][0]
        await leases[new].stop()
        t0 = time.monotonic()
        while not leases[last].held:
            assert time.monotonic() - t0 < 2.0
            await asyncio.sleep(0.05)
        await leases[last].stop()
    finally:
        for nc in ncs:
            await nc.close()


async def test_single_node_buckets_are_r1_and_behave_the_same(tmp_path):
    c = NatsCluster(tmp_path, 1)
    await c.start_all()
    nc = await _connect(c.url(0))
    try:
        b = await open_buckets(nc.jetstream(), replicas=1)
        info = await nc.jetstream().stream_info("KV_fluxrig-racks")
        assert info.config.num_replicas == 1
        rev = await b.racks.create("r1", {"v": 1})
        await b.racks.update("r1", {"v": 2}, rev)
        with pytest.raises(StateConflict):
            await b.racks.update("r1", {"v": 3}, rev)
        # Re-opening binds the same buckets (a restart), values intact.
        again = await open_buckets(nc.jetstream(), replicas=1)
        assert (await again.racks.get("r1")).value == {"v": 2}
    finally:
        await nc.close()
        await c.stop()
