"""`moempi plan`: the cluster-scale time and memory forecast (perf, memory) on the terminal and as JSON."""

from __future__ import annotations

import dataclasses
import json

import click
import numpy as np

from moempi.errors import MoempiError
from moempi.perf.memory import experts_per_gpu
from moempi.perf.analytic import (Calibration, Forecast, Hardware, Layout, Traffic, forward_time, trace_pairs, traffic_from_pairs)
from moempi.io.topology import Topology, load_topology
from moempi.model.shapes import PRESETS, ModelMeta
from moempi.place.placement import Placement
from moempi.place.scoring import dest_ranks

SWEEP_KEYS = {"ep": "ep", "tokens-per-gpu": "tokens_per_gpu", "tokens": "tokens_per_gpu",
              "micro-batches": "micro_batches", "tp": "tp", "dp": "dp"}


# -- traffic from a placement or a routing trace ------------------------------------------
def placement_traffic(meta: ModelMeta, placement: Placement, layout: Layout,
                      gpus_per_node: int, link: str) -> dict[int, Traffic]:
    """Per MoE layer: uniform routing over experts, but pairs go where ``placement`` puts
    each expert (its replicas near the sender first, shared evenly), so packing and
    replication show up as per-GPU and per-link load."""
    per_expert = layout.tp * layout.tokens_per_gpu * meta.top_k / meta.num_experts
    cache: dict = {}
    out = {}
    for layer in meta.moe_layers:
        key = placement.hosts[layer]
        if key not in cache:
            pairs = np.zeros((layout.ep, layout.ep))
            for src in range(layout.ep):
                cand, ncand = placement.replica_table(layer, src)
                for e in range(meta.num_experts):
                    pairs[src, cand[e, :ncand[e]]] += per_expert / ncand[e]
            cache[key] = traffic_from_pairs(pairs, layout.tp, gpus_per_node, link)
        out[layer] = cache[key]
    return out


def read_trace(path: str, meta: ModelMeta) -> tuple[np.ndarray, dict[int, np.ndarray], int]:
    """``(home_rank [N] int32, {layer: topk_idx [N, K] int32}, world_size)`` of an output file
    written with ``--save-routing`` (docs/design.md §2.3)."""
    from moempi.io.hdf5 import open_h5
    with open_h5(path, "trace") as f:
        if "routing/home_rank" not in f:
            raise MoempiError(f"{path}: no /routing/home_rank: run with --save-routing")
        home = np.asarray(f["routing/home_rank"][()], dtype=np.int64)
        world = int(f.attrs.get("world_size", int(home.max()) + 1 if home.size else 1))
        topk = {}
        for layer in meta.moe_layers:
            name = f"routing/{layer:03d}/topk_idx"
            if name in f:
                idx = np.asarray(f[name][()], dtype=np.int64)
                if idx.shape[0] != home.shape[0] or (idx >= meta.num_experts).any():
                    raise MoempiError(f"{path}: {name} must be [N, K] with experts < "
                                      f"{meta.num_experts}")
                topk[layer] = idx
    if not topk:
        raise MoempiError(f"{path}: no /routing/<layer>/topk_idx for the model's MoE layers")
    return home, topk, world


def trace_traffic(meta: ModelMeta, home: np.ndarray, topk: dict[int, np.ndarray], world: int,
                  placement: Placement, layout: Layout, gpus_per_node: int,
                  link: str) -> dict[int, Traffic]:
    """Per traced MoE layer: the trace's token -> expert choices placed by ``placement``
    (replica choice as the runner makes it, ``place.scoring.dest_ranks``), scaled from the
    trace's N tokens to the plan's ``ep * tp * T``.  Tokens keep their home rank when the
    trace ran on ``ep`` ranks, else are re-sharded contiguously over the ``ep`` slots."""
    n = home.shape[0]
    slot = home if world == layout.ep else np.arange(n) * layout.ep // n
    scale = layout.tp * layout.tokens_per_gpu * layout.ep / n
    out = {}
    spn = max(gpus_per_node // layout.tp, 1)                 # slots per node
    for layer, idx in topk.items():
        dest = dest_ranks(idx, slot, placement, layer)      # as the runner chooses replicas
        t = traffic_from_pairs(trace_pairs(slot, dest, layout.ep, scale),
                               layout.tp, gpus_per_node, link)
        # node dispatch: one row per token and remote node instead of one per remote pair
        on = np.where(dest >= 0, dest // spn, -1)
        remote = (on >= 0) & (on != (slot // spn)[:, None])
        rows = sum(len(set(r[m])) for r, m in zip(on, remote) if m.any())
        share = rows / remote.sum() if remote.any() else 1.0
        out[layer] = dataclasses.replace(t, node_share=float(share))
    return out


# -- printing -----------------------------------------------------------------------------
def _ms(s: float) -> str:
    return f"{s * 1e3:9.3f}"


def model_line(meta: ModelMeta, name: str) -> str:
    """One line naming the model's shape: what the time and memory model count."""
    gated = lambda kind: " gated" if kind == "gated" else ""   # noqa: E731
    shared = (f", 1 shared{gated(meta.expert_kind)} expert of {meta.shared_ffn_size}"
              if meta.shared_ffn_size else "")
    groups = (f" in {meta.topk_group} of {meta.n_group} groups" if meta.n_group > 1 else "")
    return (f"model     {name}: {meta.num_layers} layers ({meta.num_dense_layers}{gated(meta.dense_kind)}"
            f" dense + {len(meta.moe_layers)} MoE), H {meta.hidden_size}, F {meta.moe_ffn_size}, "
            f"Fd {meta.dense_ffn_size}, {meta.num_experts}{gated(meta.expert_kind)} experts, "
            f"top-{meta.top_k}{groups}{shared}, {meta.weight_dtype}; "
            f"{meta.expert_bytes / 1e6:.2f} MB per expert")


def describe(meta: ModelMeta, name: str, fc: Forecast) -> str:
    """The terminal report of one forecast."""
    lo, hw = fc.layout, fc.hardware
    rate = f"{hw.gemm_flops / 1e12:.1f} TFLOP/s per GPU"
    links = (f"Alltoallv {hw.intra_Bps / 1e9:.2f} GB/s per rank" if hw.link == "measured" else
             f"intra {hw.intra_Bps / 1e9:.0f} GB/s per GPU, inter {hw.inter_Bps / 1e9:.0f} GB/s "
             f"per {hw.link} link")
    lines = [
        model_line(meta, name),
        f"layout    ep {lo.ep} x tp {lo.tp} x dp {lo.dp} = {lo.num_gpus} GPUs "
        f"({fc.nodes} node(s) of {hw.gpus_per_node} per EP group), {lo.tokens_per_gpu} tokens "
        f"per GPU, {lo.precision} on the wire",
        f"hardware  {hw.source}: {rate}, {links}, latency {hw.latency_s * 1e6:.1f} us per phase",
        "",
        "layer        compute  disp.intra  disp.inter   combine   latency  lat%   blocking  "
        "overlapped   m  skew  hides",
        "                  ms          ms          ms        ms        ms              ms"
        "          ms"]
    groups: list[list] = []
    for l in fc.layers:
        row = (l.kind, round(l.compute_s, 12), round(l.dispatch_intra_s, 12),
               round(l.dispatch_inter_s, 12), round(l.overlapped_s, 12))
        if groups and groups[-1][0] == row:
            groups[-1][1].append(l)
        else:
            groups.append([row, [l]])
    for _, members in groups:
        l = members[0]
        label = (f"{l.kind} x{len(members)}" if len(members) > 1 else f"{l.kind} {l.layer}")
        if l.kind == "dense":
            lines.append(f"{label:<10}{_ms(l.compute_s)}{'-':>12}{'-':>12}{'-':>10}{'-':>10}"
                         f"{'-':>6}{_ms(l.blocking_s):>11}{_ms(l.overlapped_s):>12}{1:>4}")
        else:
            lines.append(f"{label:<10}{_ms(l.compute_s)}{_ms(l.dispatch_intra_s):>12}"
                         f"{_ms(l.dispatch_inter_s):>12}{_ms(l.combine_s):>10}{_ms(l.latency_s):>10}"
                         f"{l.latency_share * 100:5.0f}%{_ms(l.blocking_s):>11}"
                         f"{_ms(l.overlapped_s):>12}{l.micro_batches:>4}{l.skew:6.2f}"
                         f"{'yes' if l.hidden else 'no':>7}")
    mem = fc.memory
    parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in mem.items() if k != "total" and v)
    fit = ("fits" if fc.fits else
           f"does NOT fit: smallest fitting tp = {fc.fitting_tp}" if fc.fitting_tp else
           "does NOT fit at any tp")
    moe = fc.moe_layers
    lines += [
        "",
        f"forward   {fc.forward_s * 1e3:.1f} ms for {meta.num_layers} layers "
        f"(blocking {fc.blocking_forward_s * 1e3:.1f} ms); {fc.tokens_per_s_per_gpu:,.0f} tokens/s "
        f"per GPU, {fc.tokens_per_s:,.0f} tokens/s for {lo.num_gpus} GPUs",
        f"memory    {mem['total'] / 1e9:.2f} GB per GPU of {hw.memory_bytes / 1e9:.2f} GB ({fit}); "
        f"GB: {parts}; {experts_per_gpu(meta.num_experts, lo.ep)} expert(s) per layer per slot"
        + (f" ({lo.ep // meta.num_experts} replica(s) of each expert)"
           if lo.ep >= 2 * meta.num_experts else ""),
    ]
    if moe and moe[0].shared_s:
        lines.append(f"shared    {moe[0].shared_s * 1e3:.3f} ms per MoE layer on every GPU (in "
                     "compute), each micro-batch's share while its dispatch is in flight")
    if moe and fc.tuning:
        t = fc.tuning
        lines.append(f"micro-batches {moe[0].micro_batches} (auto, as `moempi run` chooses on its "
                     f"first batch: {t['reason']}; tuning cost {fc.tuning_s * 1e3:.1f} ms)")
        if t["best"] != moe[0].micro_batches:
            lines.append(f"          the model's best count is {t['best']}: MoE layers "
                         f"{t['best_moe_s'] * 1e3:.1f} ms instead of {t['chosen_moe_s'] * 1e3:.1f} "
                         f"ms; set pipeline.micro_batches = {t['best']} (or run more batches: "
                         "--batches)")
    elif moe:
        lines.append(f"micro-batches {moe[0].micro_batches} (given)")
    return "\n".join(lines)


def sweep_table(key: str, values: list, forecasts: list[Forecast]) -> str:
    """One row per swept value: how time, throughput and memory scale."""
    head = (f"{key:>14} {'GPUs':>6} {'nodes':>5} {'compute':>8} {'exchange':>9} {'overlap':>8} "
            f"{'exposed':>8} {'m':>3} {'hides':>5} {'forward':>8} {'tok/s/GPU':>10} {'cluster tok/s':>14} "
            f"{'mem GB':>7} {'fits':>6}")
    units = (f"{'':>14} {'':>6} {'':>5} {'ms':>8} {'ms':>9} {'ms':>8} {'ms':>8} {'':>3} {'':>5} "
             f"{'ms':>8}")
    rows = [head, units]
    for value, fc in zip(values, forecasts):
        moe = fc.moe_layers
        worst = max(moe, key=lambda l: l.overlapped_s) if moe else fc.layers[0]
        exchange = worst.latency_s + worst.dispatch_s + worst.combine_s
        fits = "yes" if fc.fits else (f"tp={fc.fitting_tp}" if fc.fitting_tp else "no")
        rows.append(f"{value:>14} {fc.layout.num_gpus:>6} {fc.nodes:>5} "
                    f"{worst.compute_s * 1e3:8.3f} {exchange * 1e3:9.3f} "
                    f"{worst.overlapped_s * 1e3:8.3f} {worst.exposed_s * 1e3:8.3f} "
                    f"{worst.micro_batches:>3} {'yes' if worst.hidden else 'no':>5} "
                    f"{fc.forward_s * 1e3:8.1f} "
                    f"{fc.tokens_per_s_per_gpu:10,.0f} {fc.tokens_per_s:14,.0f} "
                    f"{fc.memory['total'] / 1e9:7.2f} {fits:>6}")
    return "\n".join(rows)


# -- the command --------------------------------------------------------------------------
def _parse_sweep(text: str) -> tuple[str, list[int]]:
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or key not in SWEEP_KEYS:
        raise MoempiError(f"--sweep: expected KEY=v1,v2,... with KEY one of "
                          f"{', '.join(SWEEP_KEYS)}, got {text!r}")
    try:
        out = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise MoempiError(f"--sweep {key}: values must be integers, got {values!r}") from None
    if not out:
        raise MoempiError(f"--sweep {key}: give at least one value")
    return key, out


def _load_model(model: str | None, preset: str) -> tuple[ModelMeta, str]:
    if model:
        from moempi.io.hdf5 import read_model_meta
        return read_model_meta(model), model
    if preset not in PRESETS:
        raise MoempiError(f"--preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    return PRESETS[preset], preset


def run_plan(meta: ModelMeta, topo: Topology, layout: Layout, calibration: Calibration | None = None,
             placement: Placement | None = None, trace=None, max_micro_batches: int = 16,
             source: str = "seed", batches: int = 1) -> Forecast:
    """One forecast: hardware from the calibration (at ``ep * tp`` ranks) or the topology;
    traffic from the trace, else the placement, else uniform routing."""
    hw = (calibration.hardware(layout.ep * layout.tp, topo) if calibration
          else Hardware.from_topology(topo, source))
    layout.validate(hw.gpus_per_node)
    if placement is not None and placement.num_ranks != layout.ep:
        raise MoempiError(f"--placement: it is for {placement.num_ranks} ranks, the plan "
                          f"has ep = {layout.ep}")
    traffic = None
    if trace is not None or placement is not None:
        if placement is None:
            placement = Placement.default(meta.num_experts, layout.ep, meta.moe_layers,
                                          max(hw.gpus_per_node // layout.tp, 1))
        placement.validate(layout.ep, meta.num_experts, allow_packing=True)
        if trace is not None:
            traffic = trace_traffic(meta, *trace, placement, layout, hw.gpus_per_node, hw.link)
        else:
            traffic = placement_traffic(meta, placement, layout, hw.gpus_per_node, hw.link)
    return forward_time(meta, hw, layout, traffic, max_micro_batches, batches)


def _validate(paths, hardware_path, topology_path, json_path) -> None:
    """``--validate``: the model's prediction of finished runs against their timings."""
    from moempi.measure.validate import format_table, predict_runs, summarize
    if not hardware_path:
        raise MoempiError("--validate needs --hardware CAL.json (calibrate this machine first: "
                          "mpiexec -n P python -m moempi.measure.validate --calibration CAL.json)")
    topo = load_topology(topology_path) if topology_path else None
    rows = predict_runs(list(paths), Calibration.load(hardware_path), topo)
    click.echo(format_table(rows))
    if json_path:
        _write_json({"layers": rows, "summary": summarize(rows)}, json_path)


def _write_json(payload: dict, json_path: str) -> None:
    """``--json``: the figures to ``json_path``, or to stdout for ``-``."""
    text = json.dumps(payload, indent=1)
    if json_path == "-":
        click.echo(text)
    else:
        with open(json_path, "w") as f:
            f.write(text + "\n")


HELP = """Forecast a moempi forward pass on a cluster you may not have yet: per-layer expert
compute, dispatch and combine on the bottleneck link (intra- and inter-node), latency share,
the overlapped layer time with micro-batching, the whole forward time, tokens/s per GPU and
for the cluster, and memory per GPU against capacity (with the smallest TP that fits).
No MPI is needed.  Formulas and their sources: docs/plan.md.

\b
Examples:
  moempi plan                                   # DeepSeek-V3, seed hardware, ep 256
  moempi plan --sweep ep=16,32,64,128,256,512,1024
  moempi plan --preset deepseek-v3-full --sweep ep=16,32,64,128,256   # gated, top-8, shared
  moempi plan --ep 8 --tokens-per-gpu 8192      # does not fit: tells the TP that does
  moempi plan --hardware cal.json --ep 4 --preset small   # measured figures from moempi bench
  moempi plan --trace out.h5 --placement p.json --json plan.json
  moempi plan --hardware cal.json --validate out.h5   # predicted vs measured, per layer
"""


@click.command("plan", help=HELP)
@click.option("--model", type=click.Path(dir_okay=False), default=None,
              help="Model checkpoint (HDF5); its shape only is read.")
@click.option("--preset", default="deepseek-v3", show_default=True,
              help=f"Model shape preset when no --model: {', '.join(PRESETS)}.")
@click.option("--topology", "topology_path", type=click.Path(dir_okay=False), default=None,
              help="Topology TOML (GPUs per node, links, latency, memory, peak, MFU); "
                   "default: the seed figures.")
@click.option("--hardware", "hardware_path", type=click.Path(dir_okay=False), default=None,
              help="Calibration JSON from `moempi bench`: measured GEMM rate and Alltoallv "
                   "latency/bandwidth replace the topology's peak x MFU and link figures.")
@click.option("--ep", type=int, default=None,
              help="Expert-parallel ranks [default: the topology's GPUs / (tp*dp) with "
                   "--topology, else the number of experts].")
@click.option("--tp", type=int, default=1, show_default=True,
              help="GPUs splitting each expert (tensor parallelism, inside a node).")
@click.option("--dp", type=int, default=1, show_default=True,
              help="Data-parallel replicas of the EP x TP group.")
@click.option("--tokens-per-gpu", type=int, default=4096, show_default=True,
              help="Tokens resident on each GPU per forward pass.")
@click.option("--micro-batches", default="auto", show_default=True,
              help="Micro-batches per MoE layer; 'auto': the count `moempi run` would choose "
                   "(its tuner's rules on the model's layer times, within 2 %% of the job's "
                   "MoE work: see --batches); 'best': the count minimising the MoE layers' time.")
@click.option("--batches", type=int, default=1, show_default=True,
              help="Batches of --tokens-per-gpu the job runs (pipeline.batch_tokens): the "
                   "tuner's budget for --micro-batches auto grows with them.")
@click.option("--max-micro-batches", type=int, default=16, show_default=True,
              help="Upper bound for --micro-batches auto.")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16",
              show_default=True, help="bf16: production (BF16 on the wire); fp32: exact mode.")
@click.option("--dispatch", type=click.Choice(["direct", "node"]), default="direct",
              show_default=True,
              help="direct: each pair to its expert's GPU; node: each token once to every node "
                   "it needs, forwarded inside the node (pipeline.dispatch): fewer rows on "
                   "the inter-node links, 7 exchange steps per micro-batch instead of 3.")
@click.option("--placement", "placement_path", type=click.Path(dir_okay=False), default=None,
              help="Placement JSON: per-GPU and per-link loads follow its expert hosts.")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False), default=None,
              help="Output HDF5 of a run with --save-routing: skew and per-link traffic come "
                   "from its routing, not from uniformity.")
@click.option("--sweep", "sweep", default=None, metavar="KEY=V1,V2,...",
              help=f"Vary one of {', '.join(SWEEP_KEYS)} and print one row per value.")
@click.option("--validate", "validate_paths", multiple=True, type=click.Path(dir_okay=False),
              help="Output HDF5 of a real run (repeat the option for repeats of the same run: "
                   "their median counts): predict it with --hardware and print predicted vs "
                   "measured time per layer and the errors.  Other layout options are ignored.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the figures as JSON to this file ('-' for stdout).")
def plan(model, preset, topology_path, hardware_path, ep, tp, dp, tokens_per_gpu, micro_batches,
         batches, max_micro_batches, precision, dispatch, placement_path, trace_path, sweep,
         validate_paths, json_path):
    try:
        if validate_paths:
            _validate(validate_paths, hardware_path, topology_path, json_path)
            return
        meta, name = _load_model(model, preset)
        meta.validate(name)
        topo = load_topology(topology_path) if topology_path else Topology()
        source = topology_path or "seed"
        calibration = Calibration.load(hardware_path) if hardware_path else None
        if ep is None:
            ep = (max(topo.num_gpus // max(tp * dp, 1), 1) if topology_path
                  else meta.num_experts)
        if micro_batches in ("auto", "best"):
            mb = 0
        else:
            try:
                mb = int(micro_batches)
            except ValueError:
                raise MoempiError(f"--micro-batches: expected a count, 'auto' or 'best', "
                                  f"got {micro_batches!r}") from None
            if mb < 1:
                raise MoempiError(f"--micro-batches: must be >= 1 or 'auto', got {mb}")
        if max_micro_batches < 1:
            raise MoempiError("--max-micro-batches: must be >= 1")
        if batches < 1:
            raise MoempiError("--batches: must be >= 1")
        base = Layout(ep=ep, tp=tp, dp=dp, tokens_per_gpu=tokens_per_gpu, micro_batches=mb,
                      precision=precision, dispatch=dispatch)
        placement = (Placement.load(placement_path, meta.moe_layers) if placement_path else None)
        trace = read_trace(trace_path, meta) if trace_path else None

        def one(layout: Layout) -> Forecast:
            fc = run_plan(meta, topo, layout, calibration, placement, trace,
                          max_micro_batches, source, batches)
            if micro_batches == "best" and fc.tuning:
                fc = run_plan(meta, topo, dataclasses.replace(layout,
                                                              micro_batches=fc.tuning["best"]),
                              calibration, placement, trace, max_micro_batches, source)
            return fc

        if sweep:
            key, values = _parse_sweep(sweep)
            field = SWEEP_KEYS[key]
            forecasts = [one(dataclasses.replace(base, **{field: v})) for v in values]
            head = describe(meta, name, forecasts[0]).split("\n")
            click.echo("\n".join((head[0], head[2])))
            click.echo(f"sweep     {key}, per MoE layer on the slowest GPU: exchange = dispatch + "
                       "combine + latency at m;\n          exposed = overlapped - compute; hides: "
                       "2 x dispatch + 2 x 3 latencies <= compute (hideable at m = 2)\n")
            click.echo(sweep_table(key, values, forecasts))
            payload = {"model": name, "sweep": {"key": key, "values": values},
                       "forecasts": [fc.to_dict() for fc in forecasts]}
        else:
            fc = one(base)
            click.echo(describe(meta, name, fc))
            payload = {"model": name, **fc.to_dict()}
        if json_path:
            _write_json(payload, json_path)
    except MoempiError as exc:
        raise click.ClickException(str(exc)) from None
