"""API tokens and console logouts shared by the nodes of a cluster (api/shared_identity.py),
against a real 3-node nats-server cluster (R3 bucket): two Mixer nodes, each with its own
TokenStore and SessionStore, on different servers. A token created on one is accepted by the
other, a revoke or a logout on one counts on the other, a name is taken cluster-wide, and a
node without quorum refuses to create (503) rather than hand out a token the others refuse."""

from __future__ import annotations

import os

import nats
import pytest
from fluxrig_mixer.api.auth import Authenticator, TokenNameTaken, TokenStore
from fluxrig_mixer.api.sessions import SessionStore
from fluxrig_mixer.api.shared_identity import SharedIdentity, token_key
from fluxrig_mixer.kv import StateUnavailable
from kv_nats import NatsCluster
from mixer_fixtures import wait_for
from test_mixer_kv import _open

pytestmark = [pytest.mark.mixer, pytest.mark.timeout(120)]


@pytest.fixture
async def two_nodes(tmp_path):
    cluster = NatsCluster(tmp_path, 3)
    await cluster.start_all()
    key = os.urandom(32)  # session_key(cluster key): the same on every node
    ncs, nodes = [], []
    try:
        for url in cluster.urls[:2]:
            nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
            ncs.append(nc)
            buckets = await _open(nc)
            auth = Authenticator(TokenStore(None), SessionStore(key=key))
            shared = SharedIdentity(auth, buckets.operators)
            await shared.start(30)
            nodes.append((auth, shared))
        yield cluster, nodes
    finally:
        for _auth, shared in nodes:
            await shared.stop()
        for nc in ncs:
            await nc.close()
        await cluster.stop()


def bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


async def test_a_token_made_on_one_node_works_on_the_other_and_a_revoke_ends_it_everywhere(two_nodes):
    _cluster, ((a, _), (b, _)) = two_nodes
    rec, token = await a.create_token("ops@site-1", "operate", None, "admin")
    assert a.authenticate(bearer(token)).name == "ops@site-1"
    await wait_for(lambda: b.authenticate(bearer(token)) is not None, timeout=10, what="node b knows the token")
    assert b.authenticate(bearer(token)).role == "operate"
    with pytest.raises(TokenNameTaken):
        await b.create_token("ops@site-1", "read", None, "admin")  # taken cluster-wide
    await b.revoke_token("ops@site-1", "admin")
    assert b.authenticate(bearer(token)) is None
    await wait_for(lambda: a.authenticate(bearer(token)) is None, timeout=10, what="node a refuses the revoked token")
    # A revoked name can be given again, on either node; the old token stays dead.
    _rec2, token2 = await a.create_token("ops@site-1", "read", None, "admin")
    await wait_for(lambda: b.authenticate(bearer(token2)) is not None, timeout=10, what="the new token on b")
    assert a.authenticate(bearer(token)) is None and b.authenticate(bearer(token)) is None


async def test_a_logout_on_one_node_ends_the_session_on_the_other(two_nodes):
    _cluster, ((a, _), (b, _)) = two_nodes
    rec, token = await a.create_token("console-user", "read", None, "admin")
    await wait_for(lambda: b.tokens.get("console-user") is not None, timeout=10, what="the token on b")
    session = a.login(token)
    cookie = {"cookie": f"fluxrig_session={session.id}"}
    assert b.sessions.get(session.id) is not None  # the cookie opens node b (same key)
    assert a.sessions.delete(session.id)
    await wait_for(lambda: b.sessions.get(session.id) is None, timeout=10, what="node b refuses the logged-out cookie")
    assert b.authenticate(cookie) is None


async def test_a_node_without_quorum_gives_no_token(two_nodes):
    cluster, ((a, shared_a), _b) = two_nodes
    cluster.cut(0)  # node a's server partitioned: no quorum for the R3 bucket
    shared_a.bucket.timeout = 1.0
    with pytest.raises(StateUnavailable):
        await a.create_token("lonely", "read", None, "admin")
    assert a.tokens.get("lonely") is None
    assert token_key("lonely") == "token." + b"lonely".hex()
