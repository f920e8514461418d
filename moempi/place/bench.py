"""The placement benchmark: ours vs contiguous and EPLB over synthetic routing regimes and topologies."""

from __future__ import annotations

import time

from moempi.io.topology import Topology
from moempi.model.shapes import PRESETS
from moempi.place.optimise import place_experts
from moempi.place.routing import REGIMES, synthetic_routing

# (nodes, gpus per node, experts): equal counts, spare GPUs holding replicas, DeepSeek-V3's
# 256 experts on 256 GPUs, and packing (more experts than GPUs).
FULL_CASES = [(2, 8, 16), (4, 8, 16), (32, 8, 256), (2, 8, 24)]
QUICK_CASES = [(2, 8, 16), (4, 8, 16), (2, 8, 24)]
METHODS = ("contiguous", "eplb", "ours")


def run_benchmark(echo=print, quick: bool = False, seed: int = 0,
                  dispatch: str = "direct", objective: str = "links") -> list[dict]:
    """Optimise and score every (topology, regime) case; print a markdown table; return its rows.

    Each row: ``gpus`` ("2x8"), ``experts``, ``regime``, ``seconds`` (the optimiser's time) and
    for each method ``{method}_inter`` (max tokens on an inter-node link, over layers),
    ``{method}_gpu`` (max tokens computed by one GPU) and ``{method}_mem_spread_gb``
    (largest minus smallest node's expert memory).
    """
    num_moe_layers, tokens_per_rank = (2, 64) if quick else (4, 256)
    rows = []
    for nodes, gpus_per_node, num_experts in (QUICK_CASES if quick else FULL_CASES):
        topology = Topology(nodes=nodes, gpus_per_node=gpus_per_node, link="fat-tree")
        meta = PRESETS["deepseek-v3"].replace(num_experts=num_experts,
                                              num_layers=3 + num_moe_layers)
        for regime in REGIMES:
            routing = synthetic_routing(regime, topology.num_gpus, meta, tokens_per_rank,
                                        seed=seed, gpus_per_node=gpus_per_node)
            start = time.perf_counter()
            placement = place_experts(routing, topology, meta,
                                      allow_packing=num_experts > topology.num_gpus,
                                      dispatch=dispatch, objective=objective)
            row = {"gpus": f"{nodes}x{gpus_per_node}", "experts": num_experts, "regime": regime,
                   "seconds": time.perf_counter() - start}
            scores = dict(placement.objective["baselines"], ours=placement.objective)
            for method in METHODS:
                row[f"{method}_inter"] = scores[method]["max_inter_node_link_tokens"]
                row[f"{method}_gpu"] = scores[method]["max_gpu_tokens"]
                row[f"{method}_mem_spread_gb"] = scores[method]["node_memory_spread_gb"]
            rows.append(row)
    if dispatch == "node":
        echo("placed for and scored under node dispatch (pipeline.dispatch = node): a token "
             "crosses to each remote node once")
    echo(format_table(rows, num_moe_layers, tokens_per_rank))
    return rows


def format_table(rows: list[dict], num_moe_layers: int, tokens_per_rank: int) -> str:
    """The benchmark rows as a markdown table (values: contiguous / EPLB / ours)."""
    lines = [f"Fat-tree, top-2, {num_moe_layers} MoE layers, {tokens_per_rank} tokens per GPU; "
             "values are contiguous / EPLB / ours; 'vs best' is ours against the better baseline.",
             "",
             "| GPUs | experts | routing | max tokens per inter-node link | vs best | "
             "max tokens per GPU | node memory spread (GB) |",
             "| --- | ---: | --- | --- | ---: | --- | --- |"]
    for r in rows:
        best = min(r["contiguous_inter"], r["eplb_inter"])
        gain = f"{100.0 * (r['ours_inter'] - best) / best:+.0f}%" if best else "0%"
        triple = lambda key: " / ".join(f"{r[f'{m}_{key}']:g}" for m in METHODS)  # noqa: E731
        lines.append(f"| {r['gpus']} | {r['experts']} | {r['regime']} | {triple('inter')} | "
                     f"{gain} | {triple('gpu')} | {triple('mem_spread_gb')} |")
    return "\n".join(lines)
