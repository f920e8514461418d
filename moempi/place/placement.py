"""The expert -> ranks map: default rules, placement JSON (docs/design.md §2.4), validation; pure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from moempi.errors import MoempiError
from moempi.io.readers import read_json

FORMAT = "moempi-placement"
VERSION = 1


def default_hosts(num_experts: int, num_ranks: int) -> tuple[tuple[int, ...], ...]:
    """docs/design.md §2.4 default for one layer: the ranks hosting each expert.

    ranks >= experts: expert ``e`` on every rank ``r`` with ``r % E == e`` (spares hold replicas);
    experts > ranks (packing): expert ``e`` on rank ``e % ranks``.
    """
    if num_ranks >= num_experts:
        return tuple(tuple(range(e, num_ranks, num_experts)) for e in range(num_experts))
    return tuple((e % num_ranks,) for e in range(num_experts))


@dataclass(frozen=True)
class Placement:
    """For every MoE layer, the ranks hosting a replica of each expert.

    ``hosts[layer][e]`` is a sorted tuple of ranks; every MoE layer is present (layers the
    JSON does not list get :func:`default_hosts`).  ``gpus_per_node`` (from the placement's
    topology, or 0 when unknown) decides which replica is "near" a token's home rank.
    """

    num_ranks: int
    num_experts: int
    hosts: dict[int, tuple[tuple[int, ...], ...]]
    gpus_per_node: int = 0
    topology: dict = field(default_factory=dict)
    objective: dict = field(default_factory=dict)
    defaulted: tuple[int, ...] = ()     # MoE layers the JSON did not list (given the default)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def default(cls, num_experts: int, num_ranks: int, moe_layers, gpus_per_node: int = 0):
        hosts = default_hosts(num_experts, num_ranks)
        return cls(num_ranks, num_experts, {int(l): hosts for l in moe_layers}, gpus_per_node)

    @classmethod
    def from_dict(cls, data: dict, moe_layers, source: str = "placement") -> "Placement":
        """Parse placement JSON data; fill unlisted MoE layers with the default rule."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise MoempiError(f"{source}: not a moempi placement (format must be {FORMAT!r})")
        if data.get("version") != VERSION:
            raise MoempiError(f"{source}: unsupported placement version {data.get('version')!r}"
                              f" (this moempi reads version {VERSION})")
        try:
            num_ranks = int(data["num_ranks"])
            num_experts = int(data["num_experts"])
        except (KeyError, TypeError, ValueError):
            raise MoempiError(f"{source}: num_ranks and num_experts must be integers") from None
        if num_ranks < 1 or num_experts < 1:
            raise MoempiError(f"{source}: num_ranks and num_experts must be >= 1")
        topology = data.get("topology") or {}
        gpus_per_node = int(topology.get("gpus_per_node", 0) or 0)
        if topology and "nodes" in topology and int(topology["nodes"]) * gpus_per_node != num_ranks:
            raise MoempiError(f"{source}: topology has {topology['nodes']} x {gpus_per_node} GPUs "
                              f"but the placement has {num_ranks} ranks")
        moe_layers = [int(l) for l in moe_layers]
        layers = data.get("layers") or {}
        if not isinstance(layers, dict):
            raise MoempiError(f"{source}: 'layers' must map a layer index to expert host lists")
        hosts = {}
        for key, lists in layers.items():
            try:
                layer = int(key)
            except ValueError:
                raise MoempiError(f"{source}: layer key {key!r} is not an integer") from None
            if layer not in moe_layers:
                raise MoempiError(f"{source}: layer {layer} is not a MoE layer of the model "
                                  f"(MoE layers are {moe_layers[0]}..{moe_layers[-1]})"
                                  if moe_layers else f"{source}: the model has no MoE layers")
            if not isinstance(lists, list) or len(lists) != num_experts:
                raise MoempiError(f"{source}: layer {layer} must list hosts for each of "
                                  f"{num_experts} experts")
            per_expert = []
            for e, ranks in enumerate(lists):
                if (not isinstance(ranks, list) or not ranks
                        or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks)):
                    raise MoempiError(f"{source}: layer {layer} expert {e}: hosts must be a "
                                      "non-empty list of rank numbers")
                per_expert.append(tuple(sorted(ranks)))
            hosts[layer] = tuple(per_expert)
        default = default_hosts(num_experts, num_ranks)
        defaulted = tuple(l for l in moe_layers if l not in hosts)
        for layer in defaulted:
            hosts[layer] = default
        return cls(num_ranks, num_experts, hosts, gpus_per_node, dict(topology),
                   dict(data.get("objective") or {}), defaulted)

    @classmethod
    def load(cls, path: str, moe_layers) -> "Placement":
        return cls.from_dict(read_json(path, "placement"), moe_layers, source=path)

    def to_dict(self) -> dict:
        data = {"format": FORMAT, "version": VERSION, "num_ranks": self.num_ranks,
                "num_experts": self.num_experts}
        if self.topology:
            data["topology"] = self.topology
        data["layers"] = {str(l): [list(r) for r in self.hosts[l]] for l in sorted(self.hosts)}
        if self.objective:
            data["objective"] = self.objective
        return data

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    # -- checks -------------------------------------------------------------------------
    def validate(self, num_ranks: int, num_experts: int, allow_packing: bool = False,
                 source: str = "placement") -> "Placement":
        """Check the map against the job: world size, expert count, rank range, packing."""
        if self.num_ranks != num_ranks:
            raise MoempiError(f"{source}: placement is for {self.num_ranks} ranks but the "
                              f"expert-parallel group has {num_ranks}")
        if self.num_experts != num_experts:
            raise MoempiError(f"{source}: placement is for {self.num_experts} experts but the "
                              f"model has {num_experts}")
        for layer, per_expert in sorted(self.hosts.items()):
            seen: dict[int, int] = {}
            for e, ranks in enumerate(per_expert):
                if len(set(ranks)) != len(ranks):
                    raise MoempiError(f"{source}: layer {layer} expert {e} lists a rank twice")
                for r in ranks:
                    if not 0 <= r < num_ranks:
                        raise MoempiError(f"{source}: layer {layer} expert {e} is placed on "
                                          f"rank {r}, which does not exist (ranks 0..{num_ranks - 1})")
                    if r in seen and not allow_packing:
                        raise MoempiError(
                            f"{source}: layer {layer} gives rank {r} two experts ({seen[r]} and "
                            f"{e}); set parallel.allow_packing = true to allow packing")
                    seen.setdefault(r, e)
        return self

    # -- queries used by the runner ------------------------------------------------------
    def experts_on(self, layer: int, rank: int) -> list[int]:
        """Experts of ``layer`` hosted by ``rank``, ascending."""
        return [e for e, ranks in enumerate(self.hosts[layer]) if rank in ranks]

    def replica_table(self, layer: int, home_rank: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidate ranks for tokens homed on ``home_rank``.

        Returns ``cand`` `[E, R]` int32 (padded with -1) and ``ncand`` `[E]` int32: for each
        expert, its replicas on the home rank's node when it has any there (and the topology
        is known), else all its replicas.
        """
        per_expert = self.hosts[layer]
        width = max(len(r) for r in per_expert)
        cand = np.full((self.num_experts, width), -1, dtype=np.int32)
        ncand = np.zeros(self.num_experts, dtype=np.int32)
        for e, ranks in enumerate(per_expert):
            near = ranks
            if self.gpus_per_node:
                node = home_rank // self.gpus_per_node
                near = tuple(r for r in ranks if r // self.gpus_per_node == node) or ranks
            cand[e, :len(near)] = near
            ncand[e] = len(near)
        return cand, ncand


def assign_replicas(topk_idx: np.ndarray, cand: np.ndarray, ncand: np.ndarray,
                    home_rank: int) -> np.ndarray:
    """Choose the rank that computes each (token, expert) pair.

    ``topk_idx`` `[N, K]` int (-1 = dropped); ``cand``/``ncand`` from
    :meth:`Placement.replica_table`.  An expert's pairs are dealt round-robin over its
    candidate replicas (offset by the home rank), so the replicas' loads differ by at most
    one pair per home rank.  Returns ``dest_rank`` `[N, K]` int32, -1 where dropped.
    """
    flat = topk_idx.reshape(-1)
    dest = np.full(flat.shape, -1, dtype=np.int32)
    live = np.flatnonzero(flat >= 0)
    if live.size == 0:
        return dest.reshape(topk_idx.shape)
    experts = flat[live]
    if (ncand[experts] == 1).all():                     # no replicas in play: direct lookup
        dest[live] = cand[experts, 0]
        return dest.reshape(topk_idx.shape)
    order = np.argsort(experts, kind="stable")
    sorted_experts = experts[order]
    starts = np.searchsorted(sorted_experts, sorted_experts, side="left")
    ordinal = np.empty_like(order)
    ordinal[order] = np.arange(order.size) - starts     # position among pairs of that expert
    slot = (ordinal + home_rank) % ncand[experts]
    dest[live] = cand[experts, slot]
    return dest.reshape(topk_idx.shape)
