"""Node-deduplicated dispatch (``pipeline.dispatch = "node"``): a token crosses to each
destination node once, whatever the number of its experts there.

Three exchange channels per micro-batch, each a :class:`moempi.runtime.dispatch.Exchanger`:

* ``inter`` on the replica's communicator: stage 1.  Each token is sent once to one rank of
  every node hosting one of its pairs (the *relay*: rank ``(home + token) mod G`` of that
  node's ``G`` ranks, which spreads a node's incoming tokens over its ranks).  Its "experts"
  are the nodes, so the plan's counts are rows per (relay, node).
* ``meta`` on its own communicator, with the same plan: each such row's routing, the token's
  ``K`` (expert, rank, weight) triples as float32 bit patterns (always fp32: BF16 would
  round them).
* ``intra`` on the node's communicator: stage 2.  The relay forwards each row to the ranks
  of its node that compute the token's pairs there, exactly as the direct dispatch does.

The combine reverses it: the experts' rows return to the relay (stage 2), which sums each
token's weighted outputs of its node into one row, and that row crosses back to the
token's home (stage 1), where the rows of its nodes are added.  Nodes are groups of ``G``
consecutive ranks (node-major, docs/design.md §2.4).
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from moempi.errors import MoempiError
from moempi.runtime.dispatch import Exchanger


class NodeExchanger:
    """One micro-batch's three channels; ``comm`` the replica's, ``gpus_per_node`` ``G``."""

    def __init__(self, comm: MPI.Comm, gpus_per_node: int, hidden: int, num_experts: int,
                 top_k: int, precision: str, blocking: bool = False, backend=None):
        G = gpus_per_node
        if G < 1 or comm.size % G:
            raise MoempiError(f"pipeline.dispatch = node: {comm.size} ranks are not whole "
                              f"nodes of {G} (the placement's topology gpus_per_node)")
        self.G, self.top_k, self.rank = G, top_k, comm.rank
        self.node, self.num_nodes = comm.rank // G, comm.size // G
        self.inter = Exchanger(comm, hidden, self.num_nodes, precision, blocking, backend)
        self.meta = Exchanger(comm, 3 * top_k, self.num_nodes, "fp32", blocking, backend)
        node_comm = comm.Split(self.node, comm.rank)
        try:
            self.intra = Exchanger(node_comm, hidden, num_experts, precision, blocking, backend)
        finally:
            node_comm.Free()                 # the Exchanger holds its own duplicate

    @property
    def mpi_seconds(self) -> float:
        return self.inter.mpi_seconds + self.meta.mpi_seconds + self.intra.mpi_seconds

    def close(self) -> None:
        for ex in (self.inter, self.meta, self.intra):
            ex.close()

    def replay(self, counts) -> float:
        """The stage-1 exchanges alone (what crosses nodes), as :meth:`Exchanger.replay`."""
        return self.inter.replay(counts)

    # -- stage 1, at the token's home ---------------------------------------------------
    def to_nodes(self, dest_rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`[N, nodes]` "pairs" of stage 1: node ``j`` where the token has a pair there (-1
        elsewhere), and the relay rank receiving it."""
        N = len(dest_rank)
        nodes = np.arange(self.num_nodes, dtype=np.int32)
        on = np.where(dest_rank >= 0, dest_rank // self.G, -1)                   # [N, K]
        need = (on[:, :, None] == nodes[None, None, :]).any(axis=1)              # [N, nodes]
        relay = nodes[None, :] * self.G + (self.rank + np.arange(N)[:, None]) % self.G
        return (np.where(need, nodes[None, :], -1).astype(np.int32),
                np.where(need, relay, -1).astype(np.int32))

    def routing(self, topk_idx, topk_weights, dest_rank) -> np.ndarray:
        """`[N, 3K]` float32: each token's experts, computing ranks (bit patterns) and weights."""
        meta = np.empty((len(topk_idx), 3 * self.top_k), np.float32)
        K = self.top_k
        meta[:, :K] = np.ascontiguousarray(topk_idx, dtype=np.int32).view(np.float32)
        meta[:, K:2 * K] = np.ascontiguousarray(dest_rank, dtype=np.int32).view(np.float32)
        meta[:, 2 * K:] = topk_weights
        return meta

    # -- stage 2, at the relay ----------------------------------------------------------
    def on_this_node(self, meta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The received rows' pairs computed on this node: ``topk_idx``, local ``dest_rank``
        (-1 for the pairs of other nodes) and weights (0 there), each `[R, K]`."""
        K = self.top_k
        idx = np.ascontiguousarray(meta[:, :K]).view(np.int32)
        dest = np.ascontiguousarray(meta[:, K:2 * K]).view(np.int32)
        here = (dest >= 0) & (dest // self.G == self.node)
        return (np.where(here, idx, -1).astype(np.int32),
                np.where(here, dest % self.G, -1).astype(np.int32),
                np.where(here, meta[:, 2 * K:], 0).astype(np.float32))

    def world_ranks(self, local_counts: np.ndarray) -> np.ndarray:
        """Stage-2 counts `[G]` as counts over the replica's ranks `[P]`."""
        full = np.zeros(self.num_nodes * self.G, dtype=np.int64)
        full[self.node * self.G:(self.node + 1) * self.G] = local_counts
        return full
