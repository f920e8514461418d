"""`moempi place`: optimise, evaluate or check an expert placement; no MPI needed."""

from __future__ import annotations

import json

import click

from moempi.errors import MoempiError
from moempi.io.topology import load_topology
from moempi.model.shapes import PRESETS
from moempi.place.placement import Placement
from moempi.place.routing import REGIMES, load_trace, synthetic_routing, trace_model_meta

METRICS = ("max_inter_node_link_tokens", "max_intra_node_link_tokens", "max_gpu_tokens",
           "sum_layer_max_inter_node_link_tokens", "inter_node_tokens", "max_gpu_memory_gb",
           "node_memory_spread_gb")


def _table(columns: dict[str, dict]) -> str:
    names = list(columns)
    lines = [f"{'':40s}" + "".join(f"{n:>14s}" for n in names)]
    for metric in METRICS:
        lines.append(f"{metric:40s}" + "".join(f"{columns[n].get(metric, float('nan')):>14g}"
                                               for n in names))
    return "\n".join(lines)


def _json_attr(raw) -> dict:
    """An HDF5 attribute holding JSON text (str or bytes); {} when absent."""
    if raw is None:
        return {}
    if isinstance(raw, bytes):
        raw = raw.decode()
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        raise MoempiError(f"attribute is not valid JSON: {raw[:60]!r}") from None
    return value if isinstance(value, dict) else {}


def _compare_run(path: str, topology) -> None:
    """Print predicted vs measured per-link counts of a run; fail where they differ."""
    import h5py
    from moempi.place.scoring import layer_key, link_loads, traffic_matrix
    routing = load_trace(path)
    if routing.num_ranks != topology.num_gpus:
        raise MoempiError(f"{path}: the run had {routing.num_ranks} ranks but the topology has "
                          f"{topology.num_gpus} GPUs")
    with h5py.File(path, "r") as f:
        raw = f.attrs.get("placement")
        if raw is None or "stats/traffic" not in f:
            raise MoempiError(f"{path}: needs the 'placement' attribute and /stats/traffic")
        measured = f["stats/traffic"][...]
        # the runner deals replicas round-robin within each micro-batch: split as it did
        config = _json_attr(f.attrs.get("config"))
        batch_tokens = int((config.get("pipeline") or {}).get("batch_tokens", 0) or 0)
        micro_batches = int(f.attrs.get("micro_batches", 1) or 1)
    placement = Placement.from_dict(_json_attr(raw), routing.moe_layers, source=f"{path}:placement")
    if placement.num_ranks != routing.num_ranks:
        raise MoempiError(f"{path}: the placement has {placement.num_ranks} ranks but the run had "
                          f"{routing.num_ranks}; --compare-run needs one expert-parallel group")
    shape = (len(routing.moe_layers), routing.num_ranks, routing.num_ranks)
    if measured.shape != shape:
        raise MoempiError(f"{path}: /stats/traffic has shape {measured.shape}, expected {shape}")
    click.echo(f"{'layer':>5s} {'inter-node link max':>22s} {'intra-node port max':>22s} "
               f"{'GPU tokens max':>18s}  traffic matrix   (predicted / measured)")
    differ = []
    for pos, layer in enumerate(routing.moe_layers):
        pred = traffic_matrix(routing.topk_idx[pos], routing.home_rank, placement, layer,
                              batch_tokens, micro_batches)
        kp = layer_key(link_loads(pred, topology))
        km = layer_key(link_loads(measured[pos], topology))
        same = bool((pred == measured[pos]).all())
        if not same:
            differ.append(layer)
        click.echo(f"{layer:5d} {f'{kp[0]:g} / {km[0]:g}':>22s} {f'{kp[1]:g} / {km[1]:g}':>22s} "
                   f"{f'{kp[2]:g} / {km[2]:g}':>18s}  {'equal' if same else 'DIFFERS'}")
    if differ:
        raise MoempiError(f"{path}: measured traffic differs from the prediction in MoE layer(s) "
                          f"{', '.join(map(str, differ))}")
    click.echo(f"predicted traffic equals the measured traffic in all {len(routing.moe_layers)} MoE layers")


@click.command("place")
@click.option("--topology", "topology_path", type=click.Path(dir_okay=False),
              help="Topology TOML (docs/design.md §2.5). Required except with --benchmark.")
@click.option("--model", "model_path", type=click.Path(dir_okay=False),
              help="Model HDF5 file: expert count and sizes.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), help="Model shape preset instead of --model.")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False),
              help="Routing from a run output written with `moempi run --save-routing`.")
@click.option("--synthetic", type=click.Choice(REGIMES),
              help="Synthetic routing instead of a trace: uniform, zipf (popular experts), "
                   "clusters (co-activating experts), locality (each node favours some experts).")
@click.option("--tokens-per-rank", default=256, show_default=True, help="Synthetic tokens per GPU.")
@click.option("--seed", default=0, show_default=True, help="Seed of the synthetic routing.")
@click.option("--skew", default=1.0, show_default=True, help="Zipf exponent of --synthetic zipf.")
@click.option("--allow-packing", is_flag=True, help="Allow several experts per GPU (experts > GPUs).")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Write the placement JSON (docs/design.md §2.4) here, for `moempi run --placement`.")
@click.option("--evaluate", "evaluate_path", type=click.Path(dir_okay=False),
              help="Score this placement JSON on the routing instead of optimising.")
@click.option("--compare-run", "compare_path", type=click.Path(dir_okay=False),
              help="Compare a run's measured /stats/traffic with the prediction from its own "
                   "routing and placement; exits 1 where they differ.")
@click.option("--benchmark", is_flag=True, help="Run the benchmark (synthetic regimes x 2x8, "
              "4x8, 32x8 GPUs) and print its table.")
@click.option("--quick", is_flag=True, help="With --benchmark: a smaller, faster benchmark.")
@click.option("--dispatch", type=click.Choice(["direct", "node"]), default="direct",
              show_default=True,
              help="The run's pipeline.dispatch to place for and score: node counts a token "
                   "once per remote node, so co-activated experts are put on one node.")
@click.option("--objective", type=click.Choice(["links", "time"]), default="links",
              show_default=True,
              help="links: the busiest inter-node link first, then intra-node, then compute; "
                   "time: the least predicted MoE layer time, the slower of the busiest GPU's "
                   "compute and the busiest link's transfer (topology figures).")
def place(topology_path, model_path, preset, trace_path, synthetic, tokens_per_rank, seed, skew,
          allow_packing, output, evaluate_path, compare_path, benchmark, quick, dispatch,
          objective):
    """Topology-aware expert placement: decide which GPU hosts which expert of each MoE layer.

    Minimises the most loaded inter-node link, then intra-node link, keeping at most one
    expert per GPU (replicas of hot experts on spare GPUs) and memory and compute balanced.
    Prints the objective reached beside two baselines (contiguous: expert e on rank e; EPLB:
    greedy load balancing with hot replicas).

    \b
    Examples:
      moempi place --topology input/topology-2x8.toml --preset deepseek-v3 --synthetic zipf -o p.json
      moempi place --topology T.toml --model M.h5 --trace out.h5 -o placement.json
      moempi place --topology T.toml --model M.h5 --trace out.h5 --evaluate placement.json
      moempi place --topology T.toml --compare-run out.h5
      moempi place --benchmark
    """
    try:
        if benchmark:
            from moempi.place.bench import run_benchmark
            run_benchmark(echo=click.echo, quick=quick, dispatch=dispatch, objective=objective)
            return
        if not topology_path:
            raise MoempiError("place: --topology is required (except with --benchmark)")
        topology = load_topology(topology_path)
        if compare_path:
            _compare_run(compare_path, topology)
            return
        _place(topology, model_path, preset, trace_path, synthetic, tokens_per_rank, seed, skew,
               allow_packing, output, evaluate_path, dispatch, objective)
    except MoempiError as exc:
        raise click.ClickException(str(exc)) from None


def _place(topology, model_path, preset, trace_path, synthetic, tokens_per_rank, seed, skew,
           allow_packing, output, evaluate_path, dispatch="direct", objective="links"):
    from moempi.place.baselines import contiguous_placement, eplb_placement
    from moempi.place.optimise import place_experts
    from moempi.place.scoring import check_memory, evaluate
    if model_path and preset:
        raise MoempiError("place: give --model or --preset, not both")
    if bool(trace_path) == bool(synthetic):
        raise MoempiError("place: give exactly one routing source, --trace OUT.h5 or --synthetic REGIME")
    if model_path:
        from moempi.io.hdf5 import read_model_meta
        meta = read_model_meta(model_path)
    elif preset:
        meta = PRESETS[preset]
    elif trace_path:
        meta = trace_model_meta(trace_path)
    else:
        raise MoempiError("place: give --model or --preset (the model's expert count and sizes)")
    if trace_path:
        routing = load_trace(trace_path, meta)
        if routing.num_ranks != topology.num_gpus:
            raise MoempiError(f"{trace_path}: the trace was recorded on {routing.num_ranks} ranks "
                              f"but the topology has {topology.num_gpus} GPUs")
    else:
        routing = synthetic_routing(synthetic, topology.num_gpus, meta, tokens_per_rank, seed, skew,
                                    topology.gpus_per_node)
    click.echo(f"routing: {routing.source} ({routing.num_tokens} tokens, "
               f"{len(routing.moe_layers)} MoE layers); topology {topology.nodes} x "
               f"{topology.gpus_per_node} GPUs, {topology.link}")
    if evaluate_path:
        placement = Placement.load(evaluate_path, meta.moe_layers)
        if placement.num_ranks != topology.num_gpus:
            raise MoempiError(f"{evaluate_path}: placement is for {placement.num_ranks} ranks but the "
                              f"topology has {topology.nodes} x {topology.gpus_per_node} = "
                              f"{topology.num_gpus} GPUs")
        placement.validate(topology.num_gpus, meta.num_experts, allow_packing, source=evaluate_path)
        check_memory(placement, topology, meta, evaluate_path)
        columns = {"placement": evaluate(routing, placement, topology, meta, dispatch),
                   "contiguous": evaluate(routing, contiguous_placement(
                       meta.num_experts, meta.moe_layers, topology), topology, meta, dispatch),
                   "eplb": evaluate(routing, eplb_placement(routing, topology), topology, meta,
                                    dispatch)}
        click.echo(_table(columns))
        return
    placement = place_experts(routing, topology, meta, allow_packing, dispatch, objective)
    click.echo(_table({"ours": placement.objective, **placement.objective["baselines"]}))
    if output:
        placement.save(output)
        click.echo(f"wrote {output}")
