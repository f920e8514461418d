"""The two reference placements: contiguous, and EPLB-style greedy load-balanced packing with hot replicas."""

from __future__ import annotations

import dataclasses

import numpy as np

from moempi.io.topology import Topology
from moempi.place.placement import Placement


def rank_slots(num_experts: int, num_ranks: int, pos: int) -> np.ndarray:
    """Expert instances each rank hosts in MoE layer number ``pos``: `[P]` int64.

    Ranks >= experts: one each (spares hold replicas).  Packing (experts > ranks): E // P
    each, and the E % P extra slabs go to evenly spaced ranks shifted by one per layer, so
    memory evens out over the layers instead of piling onto the first ranks.
    """
    if num_ranks >= num_experts:
        return np.ones(num_ranks, dtype=np.int64)
    slots = np.full(num_ranks, num_experts // num_ranks, dtype=np.int64)
    extra = num_experts % num_ranks
    slots[(np.arange(extra) * num_ranks // max(extra, 1) + pos) % num_ranks] += 1
    return slots


def replica_counts(tokens_per_expert: np.ndarray, num_ranks: int) -> np.ndarray:
    """Replicas per expert: `[E]` int64, summing to max(P, E).

    EPLB's rule: each spare rank goes to the expert with the most tokens per replica
    (ties to the lower id).  ``tokens_per_expert`` `[E]` int.
    """
    num_experts = tokens_per_expert.shape[0]
    counts = np.ones(num_experts, dtype=np.int64)
    load = tokens_per_expert.astype(np.float64)
    for _ in range(max(0, num_ranks - num_experts)):
        counts[np.argmax(load / counts)] += 1
    return counts


def instances(tokens_per_expert: np.ndarray, num_ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """Expert instances under :func:`replica_counts`: the expert of each `[S]` int64 and its
    tokens per replica `[S]` float64."""
    counts = replica_counts(tokens_per_expert, num_ranks)
    inst_expert = np.repeat(np.arange(tokens_per_expert.shape[0]), counts)
    return inst_expert, tokens_per_expert[inst_expert] / counts[inst_expert]


def _meta_topology(topology: Topology) -> dict:
    return {"nodes": topology.nodes, "gpus_per_node": topology.gpus_per_node, "link": topology.link}


def contiguous_placement(num_experts: int, moe_layers, topology: Topology) -> Placement:
    """Expert e on rank e (docs/design.md §2.4 default; spare ranks hold replicas round-robin)."""
    default = Placement.default(num_experts, topology.num_gpus, moe_layers, topology.gpus_per_node)
    return dataclasses.replace(default, topology=_meta_topology(topology))


def _lpt(weights: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Longest-processing-time packing: item i (heaviest first) to the lightest bin with room.

    ``weights`` `[n]`, ``capacity`` `[B]` int with sum >= n.  Returns the bin of each item `[n]`.
    """
    bins = np.empty(weights.shape[0], dtype=np.int64)
    load = np.zeros(capacity.shape[0])
    room = capacity.astype(np.int64).copy()
    for i in np.argsort(-weights, kind="stable"):
        open_bins = np.flatnonzero(room > 0)
        b = open_bins[np.argmin(load[open_bins])]
        bins[i] = b
        load[b] += weights[i]
        room[b] -= 1
    return bins


def eplb_layer(tokens_per_expert: np.ndarray, topology: Topology, pos: int):
    """One layer of EPLB-style placement: replicate the hottest, pack by load to nodes, then GPUs.

    Returns hosts: per expert a sorted tuple of ranks.
    """
    num_experts = tokens_per_expert.shape[0]
    P, g = topology.num_gpus, topology.gpus_per_node
    inst_expert, inst_load = instances(tokens_per_expert, P)
    slots = rank_slots(num_experts, P, pos)
    inst_node = _lpt(inst_load, slots.reshape(topology.nodes, g).sum(1))
    inst_rank = np.empty_like(inst_node)
    for n in range(topology.nodes):
        mine = np.flatnonzero(inst_node == n)
        inst_rank[mine] = n * g + _lpt(inst_load[mine], slots[n * g:(n + 1) * g])
    return hosts_from_instances(inst_expert, inst_rank, num_experts)


def hosts_from_instances(inst_expert: np.ndarray, inst_rank: np.ndarray, num_experts: int):
    """Per expert, the sorted tuple of ranks holding its instances."""
    hosts = [[] for _ in range(num_experts)]
    for e, r in zip(inst_expert.tolist(), inst_rank.tolist()):
        hosts[e].append(r)
    return tuple(tuple(sorted(r)) for r in hosts)


def eplb_placement(routing, topology: Topology) -> Placement:
    """EPLB-style placement of every MoE layer from ``routing``'s tokens per expert."""
    hosts = {}
    for pos, layer in enumerate(routing.moe_layers):
        tokens_per_expert = routing.counts(pos).sum(0)   # [E]
        hosts[layer] = eplb_layer(tokens_per_expert, topology, pos)
    return Placement(topology.num_gpus, routing.num_experts, hosts, topology.gpus_per_node,
                     _meta_topology(topology))
