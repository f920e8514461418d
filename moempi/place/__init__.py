"""Topology-aware expert placement: routing models, scoring, the optimiser, baselines, `moempi place`."""

from .baselines import contiguous_placement, eplb_placement
from .optimise import place_experts
from .routing import RoutingTrace, load_trace, synthetic_routing, REGIMES
from .scoring import evaluate, traffic_matrix, link_loads

__all__ = ["RoutingTrace", "load_trace", "synthetic_routing", "REGIMES", "traffic_matrix",
           "link_loads", "evaluate", "place_experts", "contiguous_placement", "eplb_placement"]
