"""Cluster topology and hardware figures (docs/design.md §2.5), read from TOML; pure, no MPI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moempi.errors import MoempiError
from moempi.io.readers import read_toml

LINK_KINDS = ("fat-tree", "direct")


@dataclass(frozen=True)
class Topology:
    """Nodes of GPUs joined by links.  Defaults are the mission's seed hardware figures.

    Ranks are laid out node-major: rank ``r`` is on node ``r // gpus_per_node``.
    """

    nodes: int = 2
    gpus_per_node: int = 8
    link: str = "fat-tree"               # "fat-tree": one up/down link per node to a switch;
                                         # "direct": one link per pair of nodes
    inter_node_bandwidth_gbs: float = 1800.0   # GB/s per inter-node link, each direction
    intra_node_bandwidth_gbs: float = 1800.0   # GB/s per GPU port inside a node, each direction
    utilisation: float = 0.8             # achievable fraction of link bandwidth
    latency_us: float = 100.0            # per-transfer latency, microseconds (seed: < 100 us)
    gpu_memory_gb: float = 64.0          # memory per GPU, GB (1e9 bytes)
    peak_tflops: float = 400.0           # dense BF16 peak per GPU, TFLOP/s
    mfu: float = 0.6                     # achieved fraction of peak in expert GEMMs

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self) -> "Topology":
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise MoempiError(f"topology: nodes ({self.nodes}) and gpus_per_node "
                              f"({self.gpus_per_node}) must be >= 1")
        if self.link not in LINK_KINDS:
            raise MoempiError(f"topology: link must be one of {', '.join(LINK_KINDS)}, "
                              f"not {self.link!r}")
        for name in ("inter_node_bandwidth_gbs", "intra_node_bandwidth_gbs", "gpu_memory_gb",
                     "peak_tflops"):
            if not getattr(self, name) > 0:
                raise MoempiError(f"topology: {name} must be > 0")
        for name in ("utilisation", "mfu"):
            if not 0 < getattr(self, name) <= 1:
                raise MoempiError(f"topology: {name} must be in (0, 1]")
        if self.latency_us < 0:
            raise MoempiError("topology: latency_us must be >= 0")
        return self


def topology_from_dict(data: dict, source: str = "topology") -> Topology:
    """Build a Topology from a mapping (the ``[topology]`` table or a whole file)."""
    data = dict(data.get("topology", data))
    known = {f.name: f for f in dataclasses.fields(Topology)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise MoempiError(f"{source}: unknown topology key(s): {', '.join(unknown)} "
                          f"(known: {', '.join(known)})")
    values = {}
    for key, value in data.items():
        kind = int if known[key].type in ("int", int) else (
            str if known[key].type in ("str", str) else float)
        try:
            if kind is int and (isinstance(value, bool) or int(value) != value):
                raise ValueError
            values[key] = kind(value)
        except (TypeError, ValueError):
            raise MoempiError(f"{source}: topology key {key!r} must be {kind.__name__}, "
                              f"got {value!r}") from None
    return Topology(**values).validate()


def load_topology(path: str) -> Topology:
    """Read a topology TOML file: keys at top level or under ``[topology]``."""
    return topology_from_dict(read_toml(path, "topology"), source=path)
