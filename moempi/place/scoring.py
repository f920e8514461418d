"""Predicted traffic of a placement on a routing (the runner's own replica choice) and its link loads."""

from __future__ import annotations

import numpy as np

from moempi.errors import MoempiError
from moempi.io.topology import Topology
from moempi.model.shapes import ModelMeta
from moempi.place.placement import Placement, assign_replicas
from moempi.place.routing import RoutingTrace


def segments(num_local: int, batch_tokens: int = 0, micro_batches: int = 1) -> list[tuple[int, int]]:
    """The runner's split of a rank's ``num_local`` tokens: batches of ``batch_tokens`` (0 = all),
    each cut into ``micro_batches`` contiguous parts; ``(start, stop)`` ranges."""
    batch = batch_tokens or max(1, num_local)
    out = []
    for lo in range(0, max(num_local, 1), batch):
        n = min(batch, num_local - lo)
        bounds = [lo + n * i // micro_batches for i in range(micro_batches + 1)]
        out += [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return out


def dest_ranks(topk_idx: np.ndarray, home_rank: np.ndarray, placement: Placement,
               layer: int, batch_tokens: int = 0, micro_batches: int = 1) -> np.ndarray:
    """The rank the runner sends each (token, expert) pair to in ``layer``.

    ``topk_idx`` `[N, K]` int32 (-1 = dropped), ``home_rank`` `[N]` int32.  Each home rank's
    tokens go, in input order and split as the runner splits them (:func:`segments`), through
    :meth:`Placement.replica_table` and :func:`assign_replicas`, exactly as the runner does:
    the round-robin over replicas restarts in every micro-batch.  Returns `[N, K]` int32.
    """
    hosts = placement.hosts[layer]
    if all(len(r) == 1 for r in hosts):                  # no replicas: a plain lookup
        lookup = np.array([r[0] for r in hosts] + [-1], dtype=np.int32)
        return lookup[topk_idx]                          # -1 indexes the trailing -1
    dest = np.full(topk_idx.shape, -1, dtype=np.int32)
    order = np.argsort(home_rank, kind="stable")         # stable: input order within a rank
    bounds = np.searchsorted(home_rank[order], np.arange(placement.num_ranks + 1))
    gpn = placement.gpus_per_node or placement.num_ranks
    tables = {}                                          # the table depends on the node only
    for rank in range(placement.num_ranks):
        rows = order[bounds[rank]:bounds[rank + 1]]
        if rows.size == 0:
            continue
        node = rank // gpn
        if node not in tables:
            tables[node] = placement.replica_table(layer, rank)
        cand, ncand = tables[node]
        for a, b in segments(rows.size, batch_tokens, micro_batches):
            dest[rows[a:b]] = assign_replicas(topk_idx[rows[a:b]], cand, ncand, rank)
    return dest


def traffic_matrix(topk_idx: np.ndarray, home_rank: np.ndarray, placement: Placement,
                   layer: int, batch_tokens: int = 0, micro_batches: int = 1) -> np.ndarray:
    """Rows sent from rank i to rank j at dispatch in ``layer``: `[P, P]` int64 (i = home)."""
    dest = dest_ranks(topk_idx, home_rank, placement, layer, batch_tokens, micro_batches)
    live = dest >= 0
    src = np.broadcast_to(home_rank[:, None], dest.shape)[live].astype(np.int64)
    P = placement.num_ranks
    return np.bincount(src * P + dest[live], minlength=P * P).reshape(P, P)


def node_rows(dest: np.ndarray, home_rank: np.ndarray, gpus_per_node: int,
              nodes: int) -> np.ndarray:
    """Rows from node a to node b under node dispatch: each token once per node holding one
    of its pairs (``dest`` `[N, K]`, -1 = dropped): `[M, M]` int64, the diagonal its own node."""
    on = np.where(dest >= 0, dest // gpus_per_node, -1)                       # [N, K]
    need = (on[:, :, None] == np.arange(nodes)[None, None, :]).any(axis=1)    # [N, M]
    home = home_rank // gpus_per_node
    out = np.zeros((nodes, nodes), dtype=np.int64)
    np.add.at(out, home, need.astype(np.int64))
    return out


def inter_links(node_traffic: np.ndarray, link: str) -> np.ndarray:
    """Tokens on each inter-node link of a node-to-node matrix (the diagonal crosses none)."""
    node_traffic = node_traffic.copy()
    np.fill_diagonal(node_traffic, 0)
    if link == "fat-tree":
        return np.concatenate([node_traffic.sum(1), node_traffic.sum(0)])
    return node_traffic.reshape(-1)


def link_loads(traffic: np.ndarray, topology: Topology) -> dict[str, np.ndarray]:
    """Tokens on each link for one layer's traffic `[P, P]` (int or float).

    Returns ``inter`` (fat-tree: each node's uplink then each node's downlink, `[2M]`;
    direct: each ordered node pair a->b, `[M*M]`, diagonal 0), ``intra_out``/``intra_in``
    `[P]` (a GPU's intra-node port, each direction; traffic to itself crosses no link)
    and ``gpu_tokens`` `[P]` (rows each GPU computes).
    """
    M, g = topology.nodes, topology.gpus_per_node
    blocks = traffic.reshape(M, g, M, g)
    inter = inter_links(blocks.sum(axis=(1, 3)), topology.link)
    same_node = np.stack([blocks[n, :, n, :] for n in range(M)])    # [M, g, g]
    diag = np.einsum("nii->ni", same_node)
    intra_out = (same_node.sum(2) - diag).reshape(-1)
    intra_in = (same_node.sum(1) - diag).reshape(-1)
    return {"inter": inter, "intra_out": intra_out, "intra_in": intra_in,
            "gpu_tokens": traffic.sum(0)}


def predicted_layer_s(gpu_tokens: float, link_tokens: float, meta: ModelMeta,
                      topology: Topology, home_tokens: float = 0.0) -> float:
    """The performance model's MoE layer time, the slower of the busiest GPU's expert GEMMs
    (``2 Me H F`` FLOPs a pair, Me = 2 matrices plain, 3 gated, as
    ``perf.expert_flops_per_pair``) plus its shared expert on its ``home_tokens`` own tokens
    (``2 Me H Fs`` FLOPs each), at ``peak_tflops x mfu``, and the busiest inter-node link's
    dispatch and combine (``2 x H`` BF16 bytes a row each way at bandwidth x utilisation):
    the two overlap, so the layer takes the larger (docs/plan.md)."""
    per_row = 2 * meta.expert_matrices * meta.hidden_size
    compute = (gpu_tokens * per_row * meta.moe_ffn_size
               + home_tokens * per_row * meta.shared_ffn_size) / (
        topology.peak_tflops * 1e12 * topology.mfu)
    link = 2 * link_tokens * meta.hidden_size * 2 / (
        topology.inter_node_bandwidth_gbs * 1e9 * topology.utilisation)
    return max(compute, link)


def layer_key(loads: dict[str, np.ndarray]) -> tuple:
    """Lexicographic objective of one layer: inter-node links, then intra-node, then compute."""
    inter = float(loads["inter"].max()) if loads["inter"].size else 0.0
    intra = float(max(loads["intra_out"].max(), loads["intra_in"].max()))
    return inter, intra, float(loads["gpu_tokens"].max())


def memory_per_gpu(placement: Placement, meta: ModelMeta) -> np.ndarray:
    """Bytes of expert weights each rank holds over all MoE layers: `[P]` int64; an expert
    slab is ``meta.expert_bytes`` (three matrices when gated).  What every rank holds besides,
    whatever the placement, is ``meta.replicated_weight_bytes``."""
    slabs = np.zeros(placement.num_ranks, dtype=np.int64)
    for per_expert in placement.hosts.values():
        for ranks in per_expert:
            slabs[list(ranks)] += 1
    return slabs * meta.expert_bytes


def node_dispatch_inter(routing: RoutingTrace, pos: int, placement: Placement,
                        topology: Topology) -> np.ndarray:
    """Tokens on each inter-node link in MoE layer number ``pos`` under node dispatch."""
    dest = dest_ranks(routing.topk_idx[pos], routing.home_rank, placement,
                      routing.moe_layers[pos])
    return inter_links(node_rows(dest, routing.home_rank, topology.gpus_per_node,
                                 topology.nodes), topology.link)


def evaluate(routing: RoutingTrace, placement: Placement, topology: Topology,
             meta: ModelMeta, dispatch: str = "direct") -> dict:
    """Objective values of ``placement`` on ``routing`` (max over MoE layers), as JSON-ready
    numbers; ``dispatch = "node"``: the inter-node links carry one row per token and remote
    node (``pipeline.dispatch = "node"``)."""
    per_layer = []
    for pos, layer in enumerate(routing.moe_layers):
        traffic = traffic_matrix(routing.topk_idx[pos], routing.home_rank, placement, layer)
        loads = link_loads(traffic, topology)
        if dispatch == "node":
            loads["inter"] = node_dispatch_inter(routing, pos, placement, topology)
        per_layer.append(layer_key(loads) + (int(loads["inter"].sum()),))
    arr = np.array(per_layer, dtype=np.float64).reshape(-1, 4)
    home = routing.num_tokens / routing.num_ranks          # tokens per GPU: the shared expert's
    times = [predicted_layer_s(gpu, inter, meta, topology, home) for inter, _, gpu, _ in arr]
    memory = memory_per_gpu(placement, meta)
    node_memory = memory.reshape(topology.nodes, topology.gpus_per_node).sum(1)
    return {
        "max_inter_node_link_tokens": int(arr[:, 0].max(initial=0)),
        "max_intra_node_link_tokens": int(arr[:, 1].max(initial=0)),
        "max_gpu_tokens": int(arr[:, 2].max(initial=0)),
        "sum_layer_max_inter_node_link_tokens": int(arr[:, 0].sum()),
        "inter_node_tokens": int(arr[:, 3].sum()),
        "predicted_moe_layers_ms": round(1e3 * float(sum(times)), 4),
        "max_gpu_memory_gb": round(float(memory.max()) / 1e9, 3),
        "node_memory_spread_gb": round(float(node_memory.max() - node_memory.min()) / 1e9, 3),
    }


def check_memory(placement: Placement, topology: Topology, meta: ModelMeta,
                 source: str = "placement") -> None:
    """Refuse a placement whose weights exceed some GPU's memory: its expert slabs plus the
    weights every rank holds (dense MLPs, gates, shared experts, norms)."""
    memory = memory_per_gpu(placement, meta)
    worst = int(memory.argmax())
    replicated = meta.replicated_weight_bytes
    if memory[worst] + replicated > topology.gpu_memory_gb * 1e9:
        raise MoempiError(f"{source}: rank {worst} would hold {memory[worst] / 1e9:.2f} GB of "
                          f"expert weights and {replicated / 1e9:.2f} GB of replicated weights "
                          f"but topology gpu_memory_gb is {topology.gpu_memory_gb}")
