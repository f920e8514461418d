"""Validation of the time model: calibrate this machine's CPU terms, predict a finished run, compare.

``calibrate`` (under MPI, all ranks measuring at once, so more ranks than cores shows up
in the rates) adds to a calibration file, per rank count: the Alltoallv latency and
bandwidth, the weight-streaming rate W (a least-squares fit of ``t(n) = n*4*H*F/R +
2*H*F*4/W`` over row counts and shapes of the bare expert MLP), and, fitted on blocking
runs of the real runner (``pipeline.run_batch``) at a calibration shape that is neither
validation shape (:func:`runner_samples`, :func:`fit_runner`, medians of repeats): the
runner's expert rate R, the per-token and per-micro-batch cost of a MoE layer's non-GEMM
work, and what a fresh process's first pass adds (its working set paged in: one cold pass,
one sample, per fresh process).  ``--add`` keeps the rank count's earlier calibration
processes and uses the median of each figure over them.

``predict_run`` reads a run's output file and asks :func:`perf.forward_time` for the same
configuration: ranks, tokens per rank, micro-batches, precision, overlap, model shape, and
the run's own routing (``/stats/traffic``: rows each rank sent to each rank, so the skew of
rows computed per rank is the measured one).  Measured per-layer time: the slowest rank's
``/timings/overall[:, l]`` (busy + wait attributed to the layer); predicted: the layer's
``overlapped_s`` (overlap on) or its blocking time (overlap off).

    mpiexec -n 2 python -m moempi.measure.validate --calibration cal.json
    mpiexec -n 2 python -m moempi.measure.validate --calibration cal.json --add   # more: medians
    mpiexec -n 4 python -m moempi.measure.validate --calibration cal.json   (and --add ...)
    moempi plan --hardware cal.json --validate out.h5
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time

import numpy as np

from moempi.errors import MoempiError
from moempi.perf.analytic import (COMPUTE_WEIGHT_BYTES, WIRE_BYTES, Calibration, Hardware, copy_seconds, dense_layer_time, layer_time, moe_compute, traffic_from_rows)
from moempi.perf.analytic import EXCHANGE_PHASES, NODE_PHASES, serial_time
from moempi.perf.memory import experts_per_gpu
from moempi.perf.predict import JobRun, forecast_job, job_traffic, predicted_seconds
from moempi.io.topology import Topology
from moempi.model.shapes import ModelMeta

SHAPES = ((512, 1024), (1024, 256))               # (H, F) the GEMM fit runs over
GEMM_ROWS = (16, 32, 128, 512)
TOLERANCE = 0.15                                   # issue 26: per-layer time within 15 %


# -- measuring (all ranks at once) ----------------------------------------------------------
def _slowest(comm, fn, repeats: int, span_s: float = 0.01) -> float:
    """Seconds per ``fn()`` with every rank calling it at once: best of ``repeats`` of the wall
    time from a common start until the last rank is done (a barrier after), ``fn`` repeated
    enough times for about ``span_s`` so that time slicing between ranks sharing a core is
    averaged in, not hidden (a rank's own clock would not see the time it waited for a core)."""
    t = time.perf_counter()
    fn()
    inner = comm.allreduce(max(1, int(span_s / max(time.perf_counter() - t, 1e-6))), op=_max())
    best = math.inf
    for _ in range(repeats):
        comm.Barrier()
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        comm.Barrier()
        best = min(best, comm.allreduce(time.perf_counter() - t, op=_max()))
    return best / inner


def _max():
    from mpi4py import MPI
    return MPI.MAX


def measure_gemm(comm, shapes=SHAPES, rows=GEMM_ROWS, repeats: int = 5) -> tuple[float, float]:
    """(gemm_flops R, weight_Bps W) of the expert MLP ``silu(h @ Win) @ Wout``, float32.

    Fits ``t / (H*F) = n * 4 / R + 2 * 4 / W`` (least squares over rows ``n`` and shapes):
    the first term is the FLOPs at the asymptotic rate, the second the fixed cost of one
    call, which scales with the weights it streams (BLAS packs ``Win`` and ``Wout``).
    """
    from moempi.model.experts import mlp
    rng = np.random.default_rng(comm.rank)
    xs, ys = [], []
    for hidden, ffn in shapes:
        w_in = rng.standard_normal((hidden, ffn), dtype=np.float32) / np.float32(hidden**0.5)
        w_out = rng.standard_normal((ffn, hidden), dtype=np.float32) / np.float32(ffn**0.5)
        for n in rows:
            h = rng.standard_normal((n, hidden), dtype=np.float32)
            mlp(h, w_in, w_out, "silu")                                   # warm
            t = _slowest(comm, lambda: mlp(h, w_in, w_out, "silu"), repeats)
            xs.append(n)
            ys.append(t / (hidden * ffn))
    slope, icept = np.polyfit(np.array(xs, float), np.array(ys), 1)
    rate = 4.0 / max(slope, 1e-30)
    return float(rate), float(8.0 / icept) if icept > 0 else 0.0


def measure_copies(comm, shape=None, tokens: int = 0, repeats: int = 5) -> tuple[float, float]:
    """(copy_elem_s, copy_bf16_elem_s): the exchange's local copies, fp32 and BF16 wire, per
    element of a row sent or received (:func:`perf.analytic.copy_seconds`), measured alone.

    One blocking dispatch + combine with the weighted sum at the calibration shape, numpy's
    local steps (what a job too short to repay loading the compiled ones runs), best of
    ``repeats``; its time outside MPI calls (gather, BF16 rounding and widening, weighted
    sum) over the slowest rank's ``(sent + received) x H`` elements."""
    from moempi.measure.bench import Shape, exchange_once, synthetic
    from moempi.model.gating import gate_probs, route
    from moempi.place.placement import assign_replicas
    from moempi.runtime.backend import HostBackend
    from moempi.runtime.dispatch import Exchanger, drive
    hidden, ffn = shape or RUNNER_SHAPE
    weights, placement, x = synthetic(comm, Shape("copies", hidden, ffn, tokens or RUNNER_TOKENS,
                                                  1, 0))
    meta, layer = weights.meta, weights.layers[0]
    topk_idx, topk_weights = route(gate_probs(x, layer.gate), meta.top_k)
    dest = assign_replicas(topk_idx, *placement.replica_table(layer.index, comm.rank), comm.rank)
    out = []
    for precision in ("fp32", "bf16"):
        ex = Exchanger(comm, hidden, meta.num_experts, precision, blocking=True,
                       backend=HostBackend())
        try:
            plan = drive(ex.plan(topk_idx, dest, sorted(layer.experts)))
            best = min(exchange_once(comm, ex, plan, x, x.copy(), topk_weights)
                       for _ in range(repeats))
        finally:
            ex.close()
        per = (best[0] - best[1]) / max((plan.num_send + plan.num_recv) * hidden, 1)
        out.append(comm.allreduce(max(per, 0.0), op=_max()))
    return out[0], out[1]


SHAPE_GRID = ((256, 512, 1024, 2048), (128, 256, 512, 1024, 2048))   # H x F of measure_shapes
SHAPE_ROWS = 256


def measure_shapes(comm, grid=SHAPE_GRID, rows: int = SHAPE_ROWS,
                   repeats: int = 5) -> dict:
    """``{(H, F): factor}``: the bare expert MLP's rate at each (H, F) of ``grid`` over its
    rate at the calibration shape :data:`RUNNER_SHAPE`, ``rows`` rows, all ranks at once,
    best of ``repeats``.  The runner's rate is fitted at one shape; a BLAS's rate is not
    the same at every shape (this project's VM: 47 GFLOP/s at H 512 / F 1024, 62 at
    512 / 512, 76 at 1024 / 256, one rank), so the model scales it by these factors
    (:meth:`perf.analytic.Hardware.rate`): a tensor-parallel shard (F / tp), a dense
    layer, a shared expert of another width."""
    from moempi.model.experts import mlp
    rng = np.random.default_rng(comm.rank)

    def rate(hidden, ffn):
        w_in = rng.standard_normal((hidden, ffn), dtype=np.float32) / np.float32(hidden ** 0.5)
        w_out = rng.standard_normal((ffn, hidden), dtype=np.float32) / np.float32(ffn ** 0.5)
        h = rng.standard_normal((rows, hidden), dtype=np.float32)
        mlp(h, w_in, w_out, "silu")                                       # warm
        return 4.0 * rows * hidden * ffn / _slowest(comm, lambda: mlp(h, w_in, w_out, "silu"),
                                                    repeats)

    ref = rate(*RUNNER_SHAPE)
    return {(h, f): rate(h, f) / ref for h in grid[0] for f in grid[1]}


RUNNER_SHAPE = (768, 512)        # (H, F) of the calibration runs: neither validation shape
RUNNER_TOKENS = 384              # tokens per rank of the calibration runs
RUNNER_LAYERS = 4                # MoE layers of the calibration runs
RUNNER_DENSE_FFN = 384           # Fd of their one dense layer, first (validation models: 96)
RUNNER_MICRO_BATCHES = (1, 4)    # blocking runs at these micro-batch counts fit the fixed cost
RUNNER_REPEATS = 3               # medians over these repeats


def runner_samples(comm, shape=RUNNER_SHAPE, tokens: int = RUNNER_TOKENS,
                   layers: int = RUNNER_LAYERS, micro_batches=RUNNER_MICRO_BATCHES,
                   repeats: int = RUNNER_REPEATS, precision: str = "fp32") -> dict:
    """Runs of the real runner (``pipeline.run_batch`` through ``bench.synthetic`` /
    ``bench.forward``) at the calibration shape (one dense layer, then ``layers`` MoE
    layers, as the validated models): first one cold blocking pass (call this first in a
    fresh process: it pages in its working set as a ``moempi run`` does), then ``repeats``
    warm blocking passes at each micro-batch count and as many overlapped ones at the
    largest (its expert GEMMs cut into the chunk a run measures, as a run cuts them).
    Per pass: the measured layers (max over ranks of busy + wait), the rows each rank sent
    to each rank, the max rows computed per layer and the slowest rank's expert time per
    layer; :func:`fit_runner` fits them."""
    from moempi.measure.bench import Shape, forward, synthetic
    from moempi.runtime import tune
    hidden, ffn = shape

    def sample(m, overlap=False, chunk=0):
        _, tel, _ = forward(comm, weights, placement, x.copy(), m, overlap, precision, chunk,
                            replay=False)
        overall = tel.seconds["busy"] + tel.seconds["wait"]
        return {"m": m, "overlap": overlap,
                "measured": np.max(comm.allgather(overall), axis=0),
                # the exchange as the rank that arrived last saw it (it waited for no one)
                "exchange": np.min(comm.allgather(overall - tel.seconds["compute"]), axis=0),
                "traffic": np.array(comm.allgather(tel.traffic)),        # [P, L_moe, P] rows
                "rows": np.max(comm.allgather(tel.rows_computed.astype(float)), axis=0),
                "expert": np.max(comm.allgather(tel.seconds["expert"]), axis=0)}

    weights, placement, x = synthetic(comm, Shape("calibration", hidden, ffn, tokens, layers,
                                                  RUNNER_DENSE_FFN))
    cold = sample(1)
    warm = [sample(m) for _ in range(repeats) for m in micro_batches]
    chunk = tune.chunk_rows(weights.meta, comm, repeats=1)[0]
    overlapped = [sample(max(micro_batches), True, chunk) for _ in range(repeats)]
    return {"meta": weights.meta, "tokens": tokens, "precision": precision, "cold": cold,
            "warm": warm, "overlapped": overlapped}


def fit_runner(comm, runs: dict, weight_Bps: float, latency_s: float,
               bandwidth_Bps: float, copies: tuple[float, float] = (0.0, 0.0),
               shapes: dict | None = None) -> tuple[float, ...]:
    """(gemm_flops, token_elem_s, micro_batch_s, first_touch_s, dense_elem_s, dense_touch_s,
    first_touch_head, overlap_micro_s, bandwidth_Bps) from :func:`runner_samples`.

    * ``bandwidth_Bps``: :func:`exchange_bandwidth`, the runner's own (``bandwidth_Bps``
      given, the bare Alltoallv probe's, where the passes give none).

    * ``gemm_flops``: the runner's own expert rate as the model uses it, ``sum(max rows *
      4HF) / sum(slowest rank's expert_s - calls * weight stream)`` over MoE layers and warm
      runs (gathered rows, chunking, polls and ranks sharing cores included).
    * With that rate the model's compute (max-loaded rank's rows, the exchange's local
      ``copies`` as :func:`measure_copies` measured them) + exchange + latency of
      each MoE layer is subtracted from the measured layer; the remainder of the warm runs'
      non-first MoE layers is fitted as ``T*H*token_elem_s + m*micro_batch_s`` from the m = 1
      and m = 4 medians (gate, packing copies, un-permute, weighted sum, rank skew beyond
      the rows, Python and plan building per micro-batch).
    * ``dense_elem_s``: the dense layer's (layer 0) median over the warm runs of measured
      minus the model's GEMM and weight stream, per ``T*(H + Fd)`` (its elementwise passes,
      :func:`perf.dense_layer_time`); ``dense_touch_s``: what the cold pass's dense layer
      took beyond that, per ``T*(H + Fd)`` (its temporaries paged in).
    * ``first_touch_s``, ``first_touch_head``: :func:`fit_first_touch`, the cold pass's MoE
      layers.
    * ``overlap_micro_s``: what the overlapped passes' non-first MoE layers took beyond the
      blocking passes' at the same count (medians), per micro-batch: on a CPU the exchange's
      copies run on the ranks' own cores, so overlap hides no bandwidth time and its
      machinery (GEMMs in chunks, polls, micro-batches interleaved) costs this.
    """
    meta, tokens = runs["meta"], runs["tokens"]
    hidden, ffn = meta.hidden_size, meta.moe_ffn_size
    moe = list(meta.moe_layers)
    per_call = 2 * hidden * ffn * COMPUTE_WEIGHT_BYTES / weight_Bps if weight_Bps else 0.0
    work = sum(float(s["rows"].sum()) * 4 * hidden * ffn for s in runs["warm"])
    spent = sum(float(s["expert"][moe].sum()) - per_call * s["m"] * len(moe)
                for s in runs["warm"])
    flops = work / max(spent, 1e-9)
    bandwidth_Bps = exchange_bandwidth(runs, latency_s) or bandwidth_Bps
    hw = Hardware(gemm_flops=flops, latency_s=latency_s, intra_Bps=bandwidth_Bps,
                  inter_Bps=bandwidth_Bps, link="measured", gpus_per_node=comm.size,
                  memory_bytes=0.0, weight_Bps=weight_Bps, copy_elem_s=copies[0],
                  copy_bf16_elem_s=copies[1],
                  gemm_shapes=tuple((h, f, v) for (h, f), v in (shapes or {}).items()))
    rest = {}
    for m in sorted({s["m"] for s in runs["warm"]}):
        rest[m] = float(np.median([_moe_residuals(comm, runs, s, hw)[1:].mean()
                                   for s in runs["warm"] if s["m"] == m]))
    m1, m2 = min(rest), max(rest)
    micro_batch_s = max((rest[m2] - rest[m1]) / (m2 - m1), 0.0) if m2 > m1 else 0.0
    token_elem_s = max((rest[m1] - m1 * micro_batch_s) / (tokens * hidden), 0.0)
    dense_elem_s = dense_touch_s = 0.0
    if meta.num_dense_layers:
        elems = tokens * (hidden + meta.dense_ffn_size)
        # GEMM and weight stream only: hw has no dense terms yet
        gemm = lambda s: dense_layer_time(meta, hw, tokens, 0, s["m"]).compute_s
        dense_elem_s = max(float(np.median([s["measured"][0] - gemm(s) for s in runs["warm"]]))
                           / elems, 0.0)
        cold = runs["cold"]
        dense_touch_s = max((cold["measured"][0] - gemm(cold)) / elems - dense_elem_s, 0.0)
    hw = dataclasses.replace(hw, token_elem_s=token_elem_s, micro_batch_s=micro_batch_s)
    first_touch_s, head = fit_first_touch(comm, runs, hw)
    overlap_micro_s = 0.0
    if runs.get("overlapped"):        # the overlapped layers beyond the blocking ones, per micro-batch
        m = runs["overlapped"][0]["m"]
        over = np.median([s["measured"][moe[1:]].mean() for s in runs["overlapped"]])
        block = np.median([s["measured"][moe[1:]].mean() for s in runs["warm"] if s["m"] == m])
        overlap_micro_s = max(float(over - block) / m, 0.0)
    return (float(flops), float(token_elem_s), float(micro_batch_s), float(first_touch_s),
            float(dense_elem_s), float(dense_touch_s), float(head), overlap_micro_s,
            float(bandwidth_Bps))


def exchange_bandwidth(runs: dict, latency_s: float) -> float:
    """The runner's own exchange bandwidth per rank, B/s: over the warm blocking passes'
    non-first MoE layers, the busiest rank's off-rank rows x H x wire bytes, both ways, over
    the exchange time of the rank that arrived last (which waited for no one) less the
    phases' latency; 0 without such passes.  On a host with more ranks than cores this is
    far below a bare Alltoallv's (measured at 4 ranks on 2 cores: 3-6 x slower): each
    exchange waits for descheduled peers, as the model's wire term then does."""
    meta = runs["meta"]
    wire = WIRE_BYTES[runs["precision"]]
    moved = spent = 0.0
    for s in runs["warm"]:
        for i, l in enumerate(list(meta.moe_layers)[1:], start=1):
            t = traffic_from_rows(s["traffic"][:, i, :].astype(float), None, 1,
                                  s["traffic"].shape[0], "measured")
            moved += 2 * t.offrank_pairs * meta.hidden_size * wire
            spent += max(float(s["exchange"][l]) - 3 * s["m"] * latency_s, 0.0)
    return moved / spent if spent > 0 and moved > 0 else 0.0


def _moe_residuals(comm, runs: dict, s: dict, hw: Hardware) -> np.ndarray:
    """Measured minus the model ``hw`` (first touch left out) per MoE layer of pass ``s``."""
    meta, tokens = runs["meta"], runs["tokens"]
    wire = WIRE_BYTES[runs["precision"]]
    out = []
    for i, l in enumerate(meta.moe_layers):
        t = traffic_from_rows(s["traffic"][:, i, :].astype(float), None, 1, comm.size,
                              "measured")
        out.append(s["measured"][l] - serial_time(layer_time(meta, hw, t, tokens, s["m"], wire, l)))
    return np.array(out)


def fit_first_touch(comm, runs: dict, hw: Hardware) -> tuple[float, float]:
    """(first_touch_s, first_touch_head) of one cold pass (``runs["cold"]`` of
    :func:`runner_samples`): what its MoE layers took beyond the warm model ``hw`` (GEMM
    rate, weight stream, ``token_elem_s``, ``micro_batch_s``, exchange), summed, per
    ``T*K*H``; and the share of that in its first MoE layer (:func:`perf.touch_shares`),
    at least an even share and at most all.  One cold pass is one sample of a noisy quantity
    (on the VM this was measured on, about one in six came out twice the others):
    :func:`calibrate` with ``add`` uses the median over processes."""
    meta = runs["meta"]
    excess = _moe_residuals(comm, runs, runs["cold"], hw)
    total = float(excess.sum())
    layers = len(excess)
    head = min(max(float(excess[0]) / total, 1.0 / layers), 1.0) if total > 0 else 0.0
    return max(total / (runs["tokens"] * meta.top_k * meta.hidden_size), 0.0), head


def _best(old: tuple, new: tuple, higher_is_better: tuple) -> tuple:
    return tuple(max(o, n) if hi else min(o, n) for o, n, hi in zip(old, new, higher_is_better))


def calibrate(comm, path: str, echo=print, keep_best: bool = False,
              add: bool = False) -> Calibration:
    """Measure this machine at ``comm.size`` ranks and add the figures to ``path`` (kept:
    the other rank counts already there).

    ``add``: keep this rank count's earlier samples (one per calibration process) and use the
    per-figure median of all of them, this one included; ``make validate`` calibrates 5 times
    per rank count, interleaved, so that one disturbed process, or one noisy cold pass (its
    ``first_touch_s``: about 1 in 6 comes out twice the rest on the VM measured), does not
    count.  Without it the rank count starts afresh from this process alone.  ``keep_best``:
    where ``path`` already has this rank count, keep the better of old and new for each
    figure (higher rates, lower latency and overheads), so calibrating several times spread
    over a busy machine's time converges to what the machine does when it is ours.
    Returns the merged calibration."""
    from moempi.runtime.dispatch import probe_network
    runs = runner_samples(comm)          # first: its cold pass needs a fresh process
    latency, bandwidth = probe_network(comm, 1024, 4, rows=64)
    _, weight_Bps = measure_gemm(comm)
    copies = measure_copies(comm)
    shapes = measure_shapes(comm)
    (flops, token_elem_s, micro_batch_s, first_touch_s, dense_elem_s, dense_touch_s,
     head, overlap_micro_s, bandwidth) = fit_runner(comm, runs, weight_Bps, latency, bandwidth,
                                                    copies, shapes)
    cal = None
    if comm.rank == 0:
        alltoall, cpu, samples = {}, {}, {}
        gemm_shapes = {k: [v] for k, v in shapes.items()}
        if os.path.exists(path):
            old = Calibration.load(path)
            alltoall = {n: (lat, bw) for n, lat, bw in old.alltoall}
            cpu = {row[0]: row[1:] for row in old.cpu}
            samples = {n: list(rows) for n, rows in old.samples}
            if add:
                for h, f, v in old.gemm_shapes:
                    gemm_shapes.setdefault((h, f), [])[:0] = list(v)
        sample = (latency, bandwidth, flops, weight_Bps, token_elem_s, micro_batch_s,
                  first_touch_s, dense_elem_s, dense_touch_s, head, *copies, overlap_micro_s)
        samples[comm.size] = (samples.get(comm.size, []) if add else []) + [sample]
        merged = tuple(float(v) for v in np.median(samples[comm.size], axis=0))
        new_a, new_c = merged[:2], merged[2:]
        if keep_best and comm.size in alltoall:
            new_a = _best(alltoall[comm.size], new_a, (False, True))
        if keep_best and comm.size in cpu:
            new_c = _best(cpu[comm.size], new_c,
                          (True, True) + (False,) * (len(new_c) - 2))
        alltoall[comm.size], cpu[comm.size] = new_a, new_c
        machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores"
        # gemm_flops (the field without cpu rows) = the rate at the fewest ranks measured
        cal = Calibration.from_measurements(cpu[min(cpu)][0], alltoall, machine, cpu=cpu,
                                            samples=samples, gemm_shapes=gemm_shapes)
        cal.save(path)
        k = len(samples[comm.size])
        echo(f"calibration at {comm.size} ranks: GEMM {flops / 1e9:.1f} GFLOP/s per rank, "
             f"weight stream {weight_Bps / 1e9:.1f} GB/s, {token_elem_s * 1e9:.2f} ns per token "
             f"per hidden element, {micro_batch_s * 1e6:.0f} us per micro-batch, first pass "
             f"{first_touch_s * 1e9:.2f} ns per pair element ({head:.0%} in the first MoE "
             f"layer), dense layer "
             f"{dense_elem_s * 1e9:.2f} + first pass {dense_touch_s * 1e9:.2f} ns per element, "
             f"overlapped {overlap_micro_s * 1e6:.0f} us more per micro-batch, "
             f"exchange copies {copies[0] * 1e9:.2f} (fp32) / {copies[1] * 1e9:.2f} (bf16) ns "
             f"per row element, Alltoallv latency {latency * 1e6:.0f} us, the runner's "
             f"exchange {bandwidth / 1e9:.2f} GB/s per rank"
             + (f"; median of {k}: GEMM {new_c[0] / 1e9:.1f} GFLOP/s, {new_c[2] * 1e9:.2f} ns, "
                f"{new_c[3] * 1e6:.0f} us, first pass {new_c[4] * 1e9:.2f} ns "
                f"({new_c[7]:.0%}), dense "
                f"{new_c[5] * 1e9:.2f} + {new_c[6] * 1e9:.2f} ns" if k > 1 else "")
             + f" -> {path}")
    return comm.bcast(cal, root=0)


# -- predicting a finished run --------------------------------------------------------------
def read_run(output_path: str) -> dict:
    """What the prediction needs from a run's output file."""
    from moempi.io.hdf5 import open_h5
    with open_h5(output_path, "output") as f:
        if f.attrs.get("format") != "moempi-output" or "timings/overall" not in f:
            raise MoempiError(f"{output_path}: not a moempi run output")
        config = json.loads(f.attrs["config"])
        return {"config": config,
                "meta": ModelMeta(**json.loads(f.attrs["model_meta"])),
                "world_size": int(f.attrs["world_size"]), "ep": int(f.attrs.get("ep", 0)),
                "tp": int(f.attrs.get("tp", 1)), "dp": int(f.attrs.get("dp", 1)),
                "dispatch": str(f.attrs.get("dispatch", "direct")),
                "gpus_per_node": int(f.attrs.get("gpus_per_node", 0)),
                "micro_batches": int(f.attrs["micro_batches"]),
                "batch_tokens": int(f.attrs.get("batch_tokens", 0)),
                "forward_s": float(f.attrs["forward_seconds"]),
                "num_tokens": int(f["hidden"].shape[0]),
                "overall": f["timings/overall"][()],              # [P, L] s
                "traffic": f["stats/traffic"][()],                # [L_moe, P, P] rows
                "rows": f["stats/tokens_per_rank"][()]}           # [L_moe, P] rows computed


def predict_runs(output_paths: list[str], calibration: Calibration,
                 topology: Topology | None = None) -> list[dict]:
    """:func:`predict_run` over repeats of one configuration: per layer the median over the
    repeats of the measured and of the predicted time (and the median forward).  Medians, not
    the fastest repeat: the calibration is a median too, so neither side is picked for luck
    (a best-of on one side only biases the comparison)."""
    runs = [predict_run(p, calibration, topology) for p in output_paths]
    if not runs:
        raise MoempiError("validate: give at least one output file")
    key = lambda r: tuple(r[0][k] for k in ("ranks", "tp", "dispatch", "overlap", "hidden",
                                             "ffn", "tokens_per_rank")) + (len(r),)
    if any(key(r) != key(runs[0]) for r in runs):
        raise MoempiError("validate: the output files are not repeats of one configuration")
    merged = []
    for layer in zip(*runs):
        r = dict(layer[0])
        for k in ("measured_s", "predicted_s", "compute_s", "measured_forward_s", *TERMS):
            r[k] = float(np.median([x[k] for x in layer]))
        r["error"] = r["predicted_s"] / r["measured_s"] - 1 if r["measured_s"] > 0 else math.nan
        meas = [x["measured_s"] for x in layer]
        r["spread"] = (max(meas) - min(meas)) / r["measured_s"] if r["measured_s"] > 0 else 0.0
        r["dominant"] = max(TERMS, key=lambda k: r[k])
        r["repeats"] = len(layer)
        merged.append(r)
    return merged


# a layer's predicted time, term by term (:func:`layer_terms`), as the table names them
TERMS = ("gemm", "copies", "per-token", "micro-batch", "first pass", "shared", "wire",
         "latency", "dense")


def layer_terms(meta: ModelMeta, hw: Hardware, lt, traffic, tokens: int, wire: int,
                experts: int = 1, tp: int = 1, phases: int = EXCHANGE_PHASES) -> dict:
    """A layer's predicted seconds split into the model's terms (one batch): the expert and
    gate GEMMs with their weight streams, the exchange's local copies, the per-token and
    per-micro-batch host work, the first pass's page faults, the shared expert, the
    bandwidth and the latency of the exchange (dense layers: all ``dense``)."""
    if lt.kind == "dense":
        return {**dict.fromkeys(TERMS, 0.0), "dense": lt.compute_s}
    copies = copy_seconds(meta, hw, traffic, wire)
    per_token = tokens * meta.hidden_size * hw.token_elem_s
    micro = lt.micro_batches * hw.micro_batch_s * phases / EXCHANGE_PHASES
    routed = lt.compute_s - lt.shared_s
    first = 0.0
    if hw.first_touch_s:
        first = routed - moe_compute(meta, hw, traffic, tokens, lt.micro_batches,
                                     experts, 0.0, wire, tp, phases)
    return {"gemm": routed - copies - per_token - micro - first, "copies": copies,
            "per-token": per_token, "micro-batch": micro, "first pass": first,
            "shared": lt.shared_s, "wire": lt.dispatch_s + lt.combine_s,
            "latency": lt.latency_s, "dense": 0.0}


def job_of(run: dict) -> JobRun:
    """The :class:`perf.predict.JobRun` of a run read by :func:`read_run`."""
    P = (run["ep"] or run["world_size"]) * run["tp"]
    return JobRun(ranks=P, tokens_per_rank=-(-run["num_tokens"] // P),
                  micro_batches=run["micro_batches"],
                  precision=run["config"]["run"]["precision"],
                  overlap=bool(run["config"]["pipeline"]["overlap"]), tp=run["tp"],
                  batch_tokens=run["batch_tokens"], dispatch=run["dispatch"],
                  gpus_per_node=run["gpus_per_node"])


def predict_run(output_path: str, calibration: Calibration,
                topology: Topology | None = None) -> list[dict]:
    """Per layer: ``{"layer", "kind", "predicted_s", "measured_s", "error", terms...}``.

    ``error`` is ``predicted / measured - 1``.  Measured: max over ranks of
    ``/timings/overall[:, l]``.  Predicted: :func:`perf.predict.forecast_job` at the run's
    ranks, tensor parallelism, dispatch, tokens per rank, micro-batch count and precision,
    with each MoE layer's rows from the run's ``/stats/traffic`` and
    ``/stats/tokens_per_rank`` (so the rows moved and computed per rank, and their skew,
    are measured), and the micro-batches one after the other when the run had
    ``--no-overlap``.
    """
    run = read_run(output_path)
    meta, job = run["meta"], job_of(run)
    if run["world_size"] != job.ranks:
        raise MoempiError(f"{output_path}: validation supports one replica (dp = 1) only")
    G = job.gpus_per_node if job.dispatch == "node" and job.gpus_per_node else job.ranks
    hw = calibration.hardware(job.ranks, topology or Topology(nodes=job.ranks // G,
                                                              gpus_per_node=G))
    per_layer = job_traffic(meta, hw, job, run["traffic"], run["rows"])
    fc = forecast_job(meta, hw, job, per_layer=per_layer)
    pred = predicted_seconds(fc, job)
    b, wire = job.batches, WIRE_BYTES[job.precision]
    epg = experts_per_gpu(meta.num_experts, job.ranks // job.tp)
    phases = NODE_PHASES if job.dispatch == "node" else EXCHANGE_PHASES
    out = []
    for lt, p in zip(fc.layers, pred):
        meas = float(run["overall"][:, lt.layer].max())
        # the terms add up to the layer without overlap; overlapped, the pipeline hides
        # part of the smaller ones, and the largest still dominates
        terms = {k: v * b for k, v in layer_terms(meta, hw, lt, per_layer.get(lt.layer),
                                                  job.batch, wire, epg, job.tp,
                                                  phases).items()}
        out.append({"layer": lt.layer, "kind": lt.kind, "predicted_s": float(p),
                    "measured_s": meas, "error": p / meas - 1 if meas > 0 else math.nan,
                    "compute_s": b * lt.compute_s, "micro_batches": lt.micro_batches,
                    "ranks": job.ranks, "tp": job.tp, "dispatch": job.dispatch,
                    "overlap": job.overlap, "tokens_per_rank": job.batch,
                    "hidden": meta.hidden_size, "ffn": meta.moe_ffn_size,
                    "measured_forward_s": run["forward_s"], **terms,
                    "dominant": max(terms, key=terms.get)})
    return out


def summarize(rows: list[dict]) -> dict:
    """Mean and max |error| of the per-layer time (MoE layers), the forward's error, and two
    measured figures the model has no term for: the run-to-run ``spread`` (median over MoE
    layers of (max - min) / median of the repeats' times: what this machine does not
    reproduce) and the ``warm_up`` (the first MoE layer's measured time over the last's,
    minus 1: a fresh process's first layers paging in and warming up, which the model's
    first-pass term covers only in part)."""
    moe = [r for r in rows if r["kind"] == "moe"]
    errs = np.abs([r["error"] for r in moe]) if moe else np.array([math.nan])
    spread = float(np.median([r.get("spread", 0.0) for r in moe])) if moe else 0.0
    fwd = rows[0]["measured_forward_s"] if rows else 0.0
    outside = (fwd - sum(r["measured_s"] for r in rows)) / fwd if fwd > 0 else 0.0
    warm_up = moe[0]["measured_s"] / moe[-1]["measured_s"] - 1 if len(moe) > 1 else 0.0
    pred = sum(r["predicted_s"] for r in rows)
    meas = rows[0]["measured_forward_s"] if rows else math.nan
    return {"mean_layer_error": float(errs.mean()), "max_layer_error": float(errs.max()),
            "spread": spread, "warm_up": float(warm_up), "outside_layers": float(outside),
            "mean_layer_signed_error": float(np.mean([r["error"] for r in moe])) if moe else math.nan,
            "predicted_forward_s": pred, "measured_forward_s": meas,
            "forward_error": pred / meas - 1 if meas else math.nan,
            "predicted_moe_layer_s": float(np.mean([r["predicted_s"] for r in moe])) if moe else 0.0,
            "measured_moe_layer_s": float(np.mean([r["measured_s"] for r in moe])) if moe else 0.0}


def describe(r0: dict) -> str:
    """One configuration in words: ranks, tp, dispatch, shape, tokens, overlap."""
    return (f"{r0['ranks']} ranks" + (f", tp {r0['tp']}" if r0.get("tp", 1) > 1 else "")
            + (", node dispatch" if r0.get("dispatch") == "node" else "")
            + f", H {r0['hidden']}, F {r0['ffn']}, {r0['tokens_per_rank']} tokens per rank, "
            f"overlap {'on' if r0['overlap'] else 'off'}")


def format_table(rows: list[dict]) -> str:
    """The per-layer table with each layer's dominant term, and the summary, for ``moempi
    plan --validate`` and ``make validate``."""
    s = summarize(rows)
    r0 = rows[0]
    moe = [r for r in rows if r["kind"] == "moe"] or rows
    lines = [f"validation: {describe(r0)}, {moe[0]['micro_batches']} micro-batch(es)"
             + (f", median of {r0['repeats']} runs" if r0.get("repeats", 1) > 1 else ""),
             f"{'layer':<10}{'predicted ms':>13}{'measured ms':>13}{'error':>9}   "
             f"dominant term (its share of the prediction's terms)"]
    for r in rows:
        total = sum(r.get(k, 0.0) for k in TERMS)
        dom = r.get("dominant", "")
        share = f"{dom} ({r[dom] / total:.0%})" if dom and total > 0 else ""
        lines.append(f"{r['kind'] + ' ' + str(r['layer']):<10}{r['predicted_s'] * 1e3:13.3f}"
                     f"{r['measured_s'] * 1e3:13.3f}{r['error'] * 100:8.1f}%   {share}")
    lines += [f"MoE layers: mean |error| {s['mean_layer_error'] * 100:.1f}%, max "
              f"{s['max_layer_error'] * 100:.1f}%"
              + (f"; not modelled, measured: "
                 + (f"run-to-run spread {s['spread'] * 100:.0f}%, "
                    if r0.get("repeats", 1) > 1 else "")
                 + f"first MoE layer {s['warm_up'] * 100:+.0f}% over the last (warm-up)"
                 if len(moe) > 1 else ""),
              f"forward: predicted {s['predicted_forward_s'] * 1e3:.1f} ms, measured "
              f"{s['measured_forward_s'] * 1e3:.1f} ms, error {s['forward_error'] * 100:+.1f}% "
              f"(not modelled: {s['outside_layers']:.0%} of it outside the layers' timings: "
              f"the final norm, writing the rows out)"]
    return "\n".join(lines)


def main(argv=None) -> None:
    """``mpiexec -n P python -m moempi.measure.validate --calibration FILE``."""
    import argparse
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--keep-best", action="store_true",
                        help="keep the better of the file's and the new figures at this rank count")
    parser.add_argument("--add", action="store_true",
                        help="add to this rank count's earlier calibrations in the file and use "
                             "the median of each figure (else start it afresh)")
    args = parser.parse_args(argv)
    from mpi4py import MPI

    from moempi.runtime.heap import keep_freed_memory
    keep_freed_memory()              # as `moempi run` does
    echo = print if MPI.COMM_WORLD.rank == 0 else (lambda *a: None)
    calibrate(MPI.COMM_WORLD, args.calibration, echo, args.keep_best, args.add)


if __name__ == "__main__":
    main()


__all__ = ["TOLERANCE", "calibrate", "format_table", "measure_gemm",
           "predict_run", "predict_runs", "read_run", "summarize"]
