"""The placement optimiser: a load- and affinity-aware greedy seed, then swap local search on link loads.

How it works, per MoE layer (layers are independent: each has its own Alltoallv):

1. Count pairs ``C[h, e]`` `[P, E]`: (token, expert) pairs from home rank h for expert e.
   Replica counts follow EPLB's rule (each spare rank to the expert with most tokens per
   replica), so per-GPU compute is as balanced as EPLB's.  With packing (E > P) each rank
   gets E // P or E // P + 1 slots (:func:`rank_slots`), so memory stays balanced.
2. Node level.  Which node holds each expert instance decides all inter-node traffic.  A
   fractional model of the runner's replica choice gives, for an expert with ``h[n]``
   instances on node n, the pairs it puts on each inter-node link: nodes holding a replica
   keep their tokens at home; the others split theirs evenly over all R replicas.  An
   expert's contribution is a vector over links (fat-tree: each node's uplink and downlink;
   direct: each ordered node pair), so link loads are a sum of per-expert vectors and a
   swap of two instances changes only the two experts' vectors.
   - Seed: instances, heaviest first, each go to the node with room that minimises the
     (maximum, sum of squares) of the partial link loads, so hot experts spread out and
     each lands where its tokens already are.
   - Local search: take the most loaded link, evaluate every swap of an instance on its
     node with an instance on another node (vectorised), apply the best one that lowers the
     maximum link load, or keeps it and lowers the sum of squares (to walk off plateaus);
     a swap may not raise the busiest replica's compute load.  Stop when none improves.
3. GPU level, per node.  With one instance per GPU, placing instance i on GPU k costs that
   GPU's intra-node port ``max(out, in)``; the optimal bottleneck assignment is found by
   bisection on the cost threshold with a bipartite matching.  With packing, instances go
   heaviest first to the least loaded GPU with a free slot.
4. The result is scored exactly (the runner's own replica choice, on the real tokens)
   against the contiguous and EPLB baselines; if either is better on (inter-node link,
   intra-node link, GPU tokens) the search is rerun seeded from it, and the best of all is
   kept.  So the placement is never worse than either baseline on the routing it learnt from.

Everything is deterministic: no random numbers, ties go to the lower index.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moempi.errors import MoempiError
from moempi.io.topology import Topology
from moempi.model.shapes import ModelMeta
from moempi.place.placement import Placement
from moempi.place.baselines import (_lpt, _meta_topology, contiguous_placement, eplb_placement, hosts_from_instances, instances, rank_slots)
from moempi.place.routing import RoutingTrace
from moempi.place.scoring import (check_memory, evaluate, layer_key, link_loads,
                                  node_dispatch_inter, predicted_layer_s, traffic_matrix)


def _contrib(pairs: np.ndarray, count: np.ndarray, link: str):
    """Link loads and busiest-replica load of experts under the fractional replica model.

    ``pairs`` `[..., M]` float: an expert's pairs from each node; ``count`` `[..., M]` int:
    its instances on each node.  Returns links `[..., 2M]` (fat-tree: up then down) or
    `[..., M*M]` (direct: a->b), and the tokens of its busiest instance `[...]`.
    """
    replicas = np.maximum(count.sum(-1, keepdims=True), 1)
    local = count > 0
    remote = np.where(local, 0.0, pairs)                 # pairs from nodes without a replica
    spilled = remote.sum(-1, keepdims=True)
    share = count / replicas
    if link == "fat-tree":
        links = np.concatenate([remote, spilled * share], axis=-1)
    else:
        links = (remote[..., :, None] * share[..., None, :]).reshape(*remote.shape[:-1], -1)
    per_instance = np.where(local, pairs / np.maximum(count, 1) + spilled / replicas, 0.0)
    return links, per_instance.max(-1)


def _link_nodes(link_index: int, num_nodes: int, link: str) -> list[int]:
    """Nodes whose experts change a link's load."""
    if link == "fat-tree":
        return [link_index % num_nodes]
    src, dst = divmod(link_index, num_nodes)
    return [dst, src]


def _greedy_seed(node_pairs: np.ndarray, inst_expert: np.ndarray, inst_load: np.ndarray,
                 node_room: np.ndarray, link: str) -> np.ndarray:
    """Node of each instance `[S]`: heaviest first, to the node that keeps link loads lowest."""
    num_nodes, num_experts = node_pairs.shape
    expert_pairs = node_pairs.T                          # [E, M]
    count = np.zeros((num_experts, num_nodes), dtype=np.int64)
    contrib = np.zeros((num_experts, 2 * num_nodes if link == "fat-tree" else num_nodes ** 2))
    loads = np.zeros(contrib.shape[1])
    room = node_room.copy()
    inst_node = np.empty(inst_expert.shape[0], dtype=np.int64)
    for i in np.argsort(-inst_load, kind="stable"):
        e = inst_expert[i]
        open_nodes = np.flatnonzero(room > 0)
        trial = np.repeat(count[e][None], open_nodes.size, axis=0)
        trial[np.arange(open_nodes.size), open_nodes] += 1
        links, _ = _contrib(np.repeat(expert_pairs[e][None], open_nodes.size, axis=0), trial, link)
        new = loads + links - contrib[e]
        # tie-break by affinity: the node sending this expert the most pairs
        best = np.lexsort((-expert_pairs[e][open_nodes], (new ** 2).sum(1), new.max(1)))[0]
        n = open_nodes[best]
        inst_node[i] = n
        count[e] = trial[best]
        loads = new[best]
        contrib[e] = links[best]
        room[n] -= 1
    return inst_node


def _local_search(node_pairs: np.ndarray, inst_expert: np.ndarray, inst_node: np.ndarray,
                  link: str, max_iters: int) -> np.ndarray:
    """Improve a node assignment `[S]` by swaps; returns the new assignment."""
    num_nodes, num_experts = node_pairs.shape
    expert_pairs = node_pairs.T                          # [E, M]
    inst_node = inst_node.copy()
    count = np.zeros((num_experts, num_nodes), dtype=np.int64)
    np.add.at(count, (inst_expert, inst_node), 1)
    contrib, busiest = _contrib(expert_pairs, count, link)   # [E, links], [E]
    cap = busiest.max() * (1 + 1e-12)                    # compute load may not grow
    for _ in range(max_iters):
        loads = contrib.sum(0)
        cur_max, cur_ss = loads.max(), (loads ** 2).sum()
        if cur_max <= 0:
            break
        tol = 1e-9 * cur_max
        top3 = np.argsort(-busiest, kind="stable")[:3]
        best_move, best_key = None, None
        for x in _link_nodes(int(np.argmax(loads)), num_nodes, link):
            here = np.flatnonzero(inst_node == x)
            there = np.flatnonzero(inst_node != x)
            ii, jj = np.repeat(here, there.size), np.tile(there, here.size)
            e, f = inst_expert[ii], inst_expert[jj]
            keep = e != f
            ii, jj, e, f = ii[keep], jj[keep], e[keep], f[keep]
            if ii.size == 0:
                continue
            y = inst_node[jj]
            rows = np.arange(ii.size)
            count_e, count_f = count[e], count[f]        # fancy indexing copies
            count_e[rows, x] -= 1
            count_e[rows, y] += 1
            count_f[rows, y] -= 1
            count_f[rows, x] += 1
            links_e, busy_e = _contrib(expert_pairs[e], count_e, link)
            links_f, busy_f = _contrib(expert_pairs[f], count_f, link)
            new = loads - contrib[e] - contrib[f] + links_e + links_f
            # busiest replica outside e and f: the first of the top three that is neither
            other = np.zeros(ii.size)
            for t in top3[::-1]:
                other = np.where((e != t) & (f != t), busiest[t], other)
            ok = np.maximum(other, np.maximum(busy_e, busy_f)) <= cap
            new_max, new_ss = new.max(1), (new ** 2).sum(1)
            better = ok & ((new_max < cur_max - tol)
                           | ((new_max <= cur_max + tol) & (new_ss < cur_ss * (1 - 1e-12) - tol)))
            if not better.any():
                continue
            cand = np.flatnonzero(better)
            k = cand[np.lexsort((new_ss[cand], new_max[cand]))[0]]
            key = (new_max[k], new_ss[k])
            if best_key is None or key < best_key:
                best_key = key
                best_move = (ii[k], jj[k], e[k], f[k], count_e[k], count_f[k], links_e[k],
                             links_f[k], busy_e[k], busy_f[k])
        if best_move is None:
            break
        i, j, e, f, ce, cf, le, lf, be, bf = best_move
        inst_node[i], inst_node[j] = inst_node[j], inst_node[i]
        count[e], count[f], contrib[e], contrib[f] = ce, cf, le, lf
        busiest[e], busiest[f] = be, bf
    return inst_node


def _matching(allowed: np.ndarray, preference: np.ndarray):
    """Perfect matching of GPUs (rows) to instances (columns) on allowed edges, or None.

    Kuhn's augmenting paths; each GPU tries instances in ``preference`` order (ascending).
    Returns ``perm`` `[g]`: the instance on each GPU.
    """
    size = allowed.shape[0]
    order = [[i for i in np.argsort(preference[k], kind="stable") if allowed[k, i]]
             for k in range(size)]
    owner = [-1] * size

    def augment(k, seen):
        for i in order[k]:
            if not seen[i]:
                seen[i] = True
                if owner[i] < 0 or augment(owner[i], seen):
                    owner[i] = k
                    return True
        return False

    for k in range(size):
        if not augment(k, [False] * size):
            return None
    perm = np.empty(size, dtype=np.int64)
    perm[owner] = np.arange(size)
    return perm


def _bottleneck_assignment(cost: np.ndarray, preference: np.ndarray) -> np.ndarray:
    """Assignment minimising the largest ``cost[gpu, instance]``: `[g]` instance per GPU."""
    levels = np.unique(cost)
    lo, hi = 0, levels.size - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _matching(cost <= levels[mid], preference) is not None:
            hi = mid
        else:
            lo = mid + 1
    return _matching(cost <= levels[lo], preference)


def _assign_gpus(pairs: np.ndarray, inst_expert: np.ndarray, inst_node: np.ndarray,
                 slots: np.ndarray, topology: Topology) -> np.ndarray:
    """Rank of each instance `[S]` given its node; ``pairs`` `[P, E]` per home rank and expert."""
    g = topology.gpus_per_node
    count = np.zeros((pairs.shape[1], topology.nodes), dtype=np.int64)
    np.add.at(count, (inst_expert, inst_node), 1)
    inst_rank = np.empty_like(inst_node)
    for n in range(topology.nodes):
        mine = np.flatnonzero(inst_node == n)
        ranks = np.arange(n * g, (n + 1) * g)
        experts = inst_expert[mine]
        if (slots[ranks] == 1).all() and mine.size == g:
            # flow[k, i]: pairs from local GPU k to local instance i (local replicas share)
            flow = pairs[np.ix_(ranks, experts)] / count[experts, n]
            cost = np.maximum(flow.sum(1)[:, None] - flow, flow.sum(0)[None, :] - flow)
            perm = _bottleneck_assignment(cost, -flow)
            inst_rank[mine[perm]] = ranks
        else:
            weight = pairs[:, experts].sum(0) / count[experts].sum(1)
            inst_rank[mine] = ranks[_lpt(weight, slots[ranks])]
    return inst_rank


def _exact_key(routing: RoutingTrace, pos: int, hosts, topology: Topology) -> tuple:
    layer = routing.moe_layers[pos]
    one = Placement(topology.num_gpus, routing.num_experts, {layer: hosts}, topology.gpus_per_node)
    return layer_key(link_loads(traffic_matrix(routing.topk_idx[pos], routing.home_rank, one, layer),
                                topology))


def _search(pairs, node_pairs, inst_expert, inst_node, slots, topology, max_iters):
    inst_node = _local_search(node_pairs, inst_expert, inst_node, topology.link, max_iters)
    inst_rank = _assign_gpus(pairs.astype(np.float64), inst_expert, inst_node, slots, topology)
    return hosts_from_instances(inst_expert, inst_rank, pairs.shape[1])


def optimise_layer(routing: RoutingTrace, pos: int, topology: Topology, baselines: list) -> tuple:
    """Hosts (per expert, a sorted tuple of ranks) for MoE layer number ``pos``."""
    pairs = routing.counts(pos)                          # [P, E], pairs per home rank, expert
    num_experts = pairs.shape[1]
    P, g = topology.num_gpus, topology.gpus_per_node
    inst_expert, inst_load = instances(pairs.sum(0), P)
    slots = rank_slots(num_experts, P, pos)
    node_room = slots.reshape(topology.nodes, g).sum(1)
    node_pairs = pairs.reshape(topology.nodes, g, num_experts).sum(1).astype(np.float64)   # [M, E]
    max_iters = 4 * inst_expert.size
    seed = _greedy_seed(node_pairs, inst_expert, inst_load, node_room, topology.link)
    candidates = [_search(pairs, node_pairs, inst_expert, seed, slots, topology, max_iters)]
    keys = [_exact_key(routing, pos, candidates[0], topology)]
    base_keys = [_exact_key(routing, pos, hosts, topology) for hosts in baselines]
    for hosts, key in zip(baselines, base_keys):
        if key < keys[0]:                                # a baseline wins: search from it too
            b_expert = np.array([e for e, rs in enumerate(hosts) for _ in rs])
            b_node = np.array([r // g for rs in hosts for r in rs])
            if (np.bincount(b_node, minlength=topology.nodes) == node_room).all():
                candidates.append(_search(pairs, node_pairs, b_expert, b_node, slots, topology,
                                          max_iters))
                keys.append(_exact_key(routing, pos, candidates[-1], topology))
    candidates += list(baselines)
    keys += base_keys
    return candidates[min(range(len(keys)), key=lambda k: (keys[k], k))]


def _node_key(routing: RoutingTrace, pos: int, hosts, topology: Topology) -> tuple:
    """Node dispatch's objective of one layer: (busiest inter-node link, all inter-node rows,
    busiest GPU), exactly as the runner routes."""
    layer = routing.moe_layers[pos]
    placement = Placement(topology.num_gpus, len(hosts), {layer: hosts}, topology.gpus_per_node)
    inter = node_dispatch_inter(routing, pos, placement, topology)
    gpu = traffic_matrix(routing.topk_idx[pos], routing.home_rank, placement, layer).sum(0)
    return float(inter.max(initial=0)), float(inter.sum()), float(gpu.max(initial=0))


def _swap(hosts, a: int, b: int):
    """``hosts`` with GPUs ``a`` and ``b`` exchanging everything they host."""
    relabel = {a: b, b: a}
    return [tuple(sorted(relabel.get(r, r) for r in ranks)) for ranks in hosts]


def node_refine(routing: RoutingTrace, pos: int, hosts, topology: Topology,
                max_rounds: int = 64):
    """Improve ``hosts`` for node dispatch, where a token crosses to a node once whatever the
    number of its experts there, so co-activated experts belong on one node.

    Swaps two GPUs of different nodes (everything they host, so every GPU's compute load and
    slab count stays, only its node changes); each round tries the swaps of a GPU on a node of
    the busiest inter-node link with every GPU elsewhere and applies the one that most lowers
    (busiest link, all inter-node rows), exactly scored (:func:`_node_key`).  Stops when none
    does.  Deterministic: ties go to the lower pair."""
    g, M = topology.gpus_per_node, topology.nodes
    slabs = np.zeros(topology.num_gpus, dtype=np.int64)
    for ranks in hosts:
        slabs[list(ranks)] += 1
    key = _node_key(routing, pos, hosts, topology)
    for _ in range(max_rounds):
        placement = Placement(topology.num_gpus, len(hosts), {routing.moe_layers[pos]: hosts}, g)
        inter = node_dispatch_inter(routing, pos, placement, topology)
        link = int(inter.argmax())
        busy = [link % M] if topology.link == "fat-tree" else [link // M, link % M]
        best = None
        for node in busy:
            for a in range(node * g, (node + 1) * g):
                for b in range(topology.num_gpus):
                    if b // g == node or slabs[a] != slabs[b]:
                        continue
                    trial = _swap(hosts, a, b)
                    k = _node_key(routing, pos, trial, topology)
                    if k[:2] < key[:2] and k[2] <= key[2] and (best is None or k < best[0]):
                        best = (k, trial)
        if best is None:
            break
        key, hosts = best
    return hosts


def _time_key(routing: RoutingTrace, pos: int, hosts, topology: Topology, meta: ModelMeta,
              dispatch: str) -> tuple:
    """(predicted layer time, busiest link, busiest GPU) of one layer's hosts."""
    if dispatch == "node":
        link, _, gpu = _node_key(routing, pos, hosts, topology)
    else:
        link, _, gpu = _exact_key(routing, pos, hosts, topology)
    home = routing.num_tokens / routing.num_ranks
    return predicted_layer_s(gpu, link, meta, topology, home), link, gpu


def place_experts(routing: RoutingTrace, topology: Topology, meta: ModelMeta,
                  allow_packing: bool = False, dispatch: str = "direct",
                  objective: str = "links") -> Placement:
    """Optimise every MoE layer's placement; the result carries its objective and the baselines'.

    ``dispatch = "node"``: each layer's result is refined for node dispatch
    (:func:`node_refine`) and scored that way, beside the baselines scored the same way; the
    best of the three by node dispatch's objective is kept.

    ``objective = "time"``: of the same candidates (ours and the two baselines) each layer
    keeps the one with the least predicted layer time (:func:`predicted_layer_s`: the slower
    of the busiest GPU's compute and the busiest link's transfer), so a little more link load
    can buy less compute imbalance, and the other way round."""
    P, E = topology.num_gpus, meta.num_experts
    objective_name = objective
    if objective not in ("links", "time"):
        raise MoempiError(f"place: objective must be links or time, not {objective!r}")
    routing.check_model(meta, routing.source)
    if routing.num_ranks != P:
        raise MoempiError(f"{routing.source}: routing is for {routing.num_ranks} ranks but the "
                          f"topology has {topology.nodes} x {topology.gpus_per_node} = {P} GPUs")
    if E > P and not allow_packing:
        raise MoempiError(f"the model has {E} experts but the topology only {P} GPUs: pass "
                          "--allow-packing to host several experts per GPU")
    # expert slabs (meta.expert_bytes: three matrices when gated) and what every GPU holds
    slabs = sum(rank_slots(E, P, pos) for pos in range(len(routing.moe_layers)))
    need = int(np.max(slabs, initial=0)) * meta.expert_bytes
    replicated = meta.replicated_weight_bytes
    if need + replicated > topology.gpu_memory_gb * 1e9:
        raise MoempiError(f"memory: each GPU must hold up to {int(np.max(slabs))} expert slabs "
                          f"({need / 1e9:.2f} GB) and {replicated / 1e9:.2f} GB of replicated "
                          "weights (dense MLPs, gates, shared experts, norms) but topology "
                          f"gpu_memory_gb is {topology.gpu_memory_gb}")
    contiguous = contiguous_placement(E, routing.moe_layers, topology)
    eplb = eplb_placement(routing, topology)
    hosts = {}
    for pos, layer in enumerate(routing.moe_layers):
        baselines = [contiguous.hosts[layer], eplb.hosts[layer]]
        hosts[layer] = optimise_layer(routing, pos, topology, baselines)
        if dispatch == "node":
            options = [node_refine(routing, pos, hosts[layer], topology), *baselines]
            keys = [_node_key(routing, pos, h, topology) for h in options]
            hosts[layer] = options[min(range(len(keys)), key=lambda k: (keys[k], k))]
        if objective == "time":
            options = [hosts[layer], *baselines]
            keys = [_time_key(routing, pos, h, topology, meta, dispatch) for h in options]
            hosts[layer] = options[min(range(len(keys)), key=lambda k: (keys[k], k))]
    ours = Placement(P, E, hosts, topology.gpus_per_node, _meta_topology(topology))
    check_memory(ours, topology, meta)
    objective = evaluate(routing, ours, topology, meta, dispatch)
    objective["routing"] = routing.source
    objective["dispatch"] = dispatch
    objective["objective"] = objective_name
    objective["baselines"] = {"contiguous": evaluate(routing, contiguous, topology, meta, dispatch),
                              "eplb": evaluate(routing, eplb, topology, meta, dispatch)}
    return dataclasses.replace(ours, objective=objective)
