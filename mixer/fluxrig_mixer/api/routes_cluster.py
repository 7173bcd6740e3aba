"""Routes: the cluster this Mixer node belongs to (issue 14).

GET /api/v1/cluster (token): on a single node `{"clustered": false, "node": <server_name>}`;
on a cluster member this node's name, the cluster name, its peer routes, the replica count
and, per stream, its leader, its replicas (current or lagging, by node name) and its message
counts, as JetStream reports them (fluxrig_mixer.cluster.ClusterView). Every node answers
for the whole cluster; a stream that lost its quorum shows `available: false`.

POST /api/v1/cluster/streams/{stream}/step-down (admin): the stream's leader steps down and the
replicas elect another (maintenance before taking a node down; `nats stream cluster step-down`).
409 on a single node, 400 for an unknown stream or when JetStream refuses.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from ..snake import SINGLE_SERVER_NAME
from .services import GUARDED, Admin, Services

__all__ = ["router", "cluster_status", "step_down"]

router = APIRouter(tags=["cluster"])


@router.get("/api/v1/cluster", dependencies=GUARDED)
async def cluster_status(services: Services):
    view = services.cluster
    if view is None:
        return {"clustered": False, "node": SINGLE_SERVER_NAME}
    return await view.status()


@router.post("/api/v1/cluster/streams/{stream}/step-down")
async def step_down(stream: str, services: Services, _who: Admin):
    view = services.cluster
    if view is None:
        raise HTTPException(409, "a single-node Mixer has no stream leaders to move")
    return await view.step_down(stream)
