"""Expert placement: the expert -> ranks map (the placement JSON, docs/design.md §2.4) and
the topology-aware optimiser with its routing models, scoring, baselines and benchmark."""

from moempi.place.baselines import contiguous_placement, eplb_placement
from moempi.place.optimise import place_experts
from moempi.place.routing import RoutingTrace, load_trace, synthetic_routing, REGIMES
from moempi.place.scoring import evaluate, traffic_matrix, link_loads

__all__ = ["RoutingTrace", "load_trace", "synthetic_routing", "REGIMES", "traffic_matrix",
           "link_loads", "evaluate", "place_experts", "contiguous_placement", "eplb_placement"]
