"""Prefix-aware routing on Ray Serve's request-router extension point.

Ray Serve asks a deployment's RequestRouter, for each request a DeploymentHandle sends, which
replicas to try (`choose_replicas`, ranks most preferred first); Ray then probes the queue length
of the replicas in a rank and sends the request to the least busy one that accepts it. This router
lives in the ingress (the handle's process). The ingress passes each request's prompt text as the
`prompt` keyword argument (`parley.deploy.ray.ParleyIngress`), and `replica` to pin a request to
one replica (the `x-parley-replica` header).
"""

from __future__ import annotations

import logging
import random
from typing import List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from parley.deploy.routing import PrefixTable, rank_replicas

log = logging.getLogger("parley.deploy")


class PrefixAffinityRouter(RequestRouter):
    """Requests sharing a prefix of at least `min_prefix_chars` characters go to the replica that
    served it last, unless it runs more than `imbalance` requests above the least loaded; other
    requests go to the least loaded replica. Settings come from RequestRouterConfig's
    `request_router_kwargs`."""

    def initialize_state(self, min_prefix_chars: int = 256, imbalance: int = 4, block_chars: int = 64,
                         capacity: int = 200_000, **unknown) -> None:
        if unknown:
            raise ValueError(f"PrefixAffinityRouter: unknown settings {sorted(unknown)}")
        if min_prefix_chars < 1 or imbalance < 0:
            raise ValueError(f"min_prefix_chars must be positive and imbalance at least 0, "
                             f"not {min_prefix_chars} and {imbalance}")
        self.min_prefix_chars = min_prefix_chars
        self.imbalance = imbalance
        self.table = PrefixTable(block_chars, capacity)

    def _load(self, replica: RunningReplica) -> int:
        """Ongoing requests, as last probed or counted by this router (0 when not known yet)."""
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        pinned = kwargs.get("replica")
        if pinned:
            # an unknown id goes anywhere: that replica answers 404 naming it (ParleyReplica.handle)
            return [[by_id[pinned]]] if pinned in by_id else [candidate_replicas]
        prompt = kwargs.get("prompt") or ""
        matched = self.table.matched_chars(prompt, by_id) if prompt else {}
        if not by_id:
            return []
        ranks = rank_replicas({i: self._load(r) for i, r in by_id.items()}, matched, self.min_prefix_chars,
                              self.imbalance)
        if len(ranks[0]) > 1:  # equally loaded: any of them, or every prompt without a prefix would go to one
            random.shuffle(ranks[0])
        return [[by_id[i] for i in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        prompt = pending_request.kwargs.get("prompt")
        if prompt:
            self.table.record(prompt, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id.unique_id)
