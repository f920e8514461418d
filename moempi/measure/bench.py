"""Microbenchmarks: expert compute vs plain GEMM, exchange vs raw Alltoallv, overlapped vs blocking.

Every figure is a ratio of two things measured in the same run on the same ranks, so it
says how close moempi's code paths come to what the machine offers, whatever the machine.
The runs go through the real code (``pipeline.run_batch`` and ``dispatch.Exchanger``) on
weights made in memory, so no model file is needed.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from moempi.model.shapes import ModelMeta
from moempi.model.stack import DenseLayer, MoeLayer, Weights
from moempi.perf.analytic import WIRE_BYTES, Calibration
from moempi.place.placement import Placement, assign_replicas
from moempi.runtime.backend import HostBackend
from moempi.runtime.dispatch import Exchanger, drive, probe_network
from moempi.runtime.pipeline import Context, Scheduler, Telemetry, run_batch
from moempi.runtime import tune
from moempi.runtime.nodes import NodeExchanger
from moempi.runtime.output import overlap_percent


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    ffn: int
    tokens: int          # tokens per rank
    layers: int          # MoE layers
    dense_ffn: int = 0   # > 0: one dense layer of MLP width Fd first (perf_validate's calibration)
    layer_target: float = 0.0  # > 0: bench micro's target for one layer over its GEMM floor


# the targets `make bench` is held to (2 ranks, one BLAS thread per rank): each is printed
# with its figure, met or not and, when not, the measurement that says why
EXCHANGE_TARGET = {"fp32": 0.8, "bf16": 0.6}     # dispatch + combine over a raw Alltoallv
AUTO_TARGET = 1.03                               # timed micro-batch count over the best fixed


# the benchmarks' host backend: with the compiled local steps (:func:`use_compiled`), as a
# job long enough to repay loading them runs (``pipeline.local_kernels = "auto"``)
HOST = HostBackend()


def use_compiled(comm, echo) -> float:
    """Give the benchmarks' backend the compiled local steps; the slowest rank's load time."""
    from moempi.model import fused
    HOST.kernels = fused.load()
    took = comm.allreduce(HOST.kernels.load_seconds, op=MPI.MAX)
    echo(f"the exchange's local steps compiled (numba), as a long job runs them: loaded in "
         f"{took:.2f} s")
    return took


def verdict(met: bool, target: str, why: str = "") -> str:
    """The line that says whether ``target`` is met (by the figure as printed, to 3
    decimals), and if not why (a measurement)."""
    return f"  target {target}: met" if met else f"  target {target}: not met: {why}"


def synthetic(comm: MPI.Comm, shape: Shape, seed: int = 0):
    """An in-memory MoE stack: one expert per rank per layer, random weights and tokens
    (after one dense layer of width ``shape.dense_ffn`` when that is > 0)."""
    E, H, F = comm.size, shape.hidden, shape.ffn
    dense = 1 if shape.dense_ffn > 0 else 0
    meta = ModelMeta(hidden_size=H, moe_ffn_size=F, dense_ffn_size=max(shape.dense_ffn, 1),
                     num_layers=shape.layers + dense, num_dense_layers=dense,
                     num_experts=max(E, 2), top_k=min(2, max(E, 2)), has_final_norm=False)
    placement = Placement.default(meta.num_experts, comm.size, meta.moe_layers)
    rng = np.random.default_rng([seed, comm.rank])
    shared = np.random.default_rng(seed)
    layers = []
    if dense:
        Fd = shape.dense_ffn
        layers.append(DenseLayer(0, np.ones(H, np.float32),
                                 (shared.standard_normal((H, Fd)) / H**0.5).astype(np.float32),
                                 (shared.standard_normal((Fd, H)) / Fd**0.5).astype(np.float32)))
    for l in meta.moe_layers:
        gate = (shared.standard_normal((H, meta.num_experts)) / H**0.5).astype(np.float32)
        layer = MoeLayer(l, np.ones(H, np.float32), gate)
        for e in placement.experts_on(l, comm.rank):
            layer.experts[e] = ((rng.standard_normal((H, F)) / H**0.5).astype(np.float32),
                                (rng.standard_normal((F, H)) / F**0.5).astype(np.float32))
        layers.append(layer)
    x = rng.standard_normal((shape.tokens, H)).astype(np.float32)
    return Weights(meta, layers, None), placement, x


def forward(comm, weights, placement, x, micro_batches: int, overlap: bool,
            precision: str = "fp32", chunk_rows: int = 0, replay: bool = True,
            gpus_per_node: int = 0, bias=None) -> tuple[float, Telemetry, float]:
    """One timed pass through ``run_batch``; returns (seconds, telemetry, pure exchange s;
    0 without ``replay``).  ``gpus_per_node`` > 0: the node-deduplicated dispatch.
    ``bias``: `[L_moe, E]` selection bias (default 0)."""
    meta = weights.meta
    moe = len(meta.moe_layers)
    ctx = _context(comm, weights, placement, chunk_rows, bias)
    tel = ctx.telemetry
    if gpus_per_node:
        exchangers = [NodeExchanger(comm, gpus_per_node, meta.hidden_size, meta.num_experts,
                                    meta.top_k, precision, blocking=not overlap, backend=HOST)
                      for _ in range(micro_batches)]
    else:
        exchangers = [Exchanger(comm, meta.hidden_size, meta.num_experts, precision,
                                blocking=not overlap, backend=HOST) for _ in range(micro_batches)]
    try:
        comm.Barrier()
        t = time.perf_counter()
        run_batch(ctx, exchangers, x, 0, 0)
        elapsed = time.perf_counter() - t
        pure = sum(exchangers[0].replay(tel.exchanges_of(m)) for m in range(moe)) if replay \
            else 0.0
    finally:
        for ex in exchangers:
            ex.close()
    return comm.allreduce(elapsed, op=MPI.MAX), tel, comm.allreduce(pure, op=MPI.MAX)


def _context(comm, weights, placement, chunk_rows: int = 0, bias=None) -> Context:
    """A fresh context for one pass of the synthetic stack on the host (no balancing bias
    unless ``bias`` `[L_moe, E]`)."""
    meta = weights.meta
    tel = Telemetry(meta.num_layers, len(meta.moe_layers), comm.size, meta.num_experts)
    if bias is None:
        bias = np.zeros((meta.num_layers, meta.num_experts), np.float32)
    return Context(weights, placement, comm.rank, 0, bias, tel, Scheduler(tel), HOST,
                   chunk_rows=chunk_rows)


def plain_gemm_flops(hidden: int, ffn: int, rows: int, repeats: int = 3) -> float:
    """The plain numpy GEMM rate on the expert's shapes: ``(rows, H) @ (H, F)`` then ``@ (F, H)``."""
    rng = np.random.default_rng(0)
    h = rng.standard_normal((rows, hidden), dtype=np.float32)
    w_in = rng.standard_normal((hidden, ffn), dtype=np.float32)
    w_out = rng.standard_normal((ffn, hidden), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        (h @ w_in) @ w_out
        best = min(best, time.perf_counter() - t)
    return 4.0 * rows * hidden * ffn / best


def bench_expert(comm, shape: Shape, echo) -> dict:
    """Expert MLP FLOP/s inside a real (blocking) run vs a plain numpy GEMM of the same rows."""
    weights, placement, x = synthetic(comm, shape)
    forward(comm, weights, placement, x, 1, False)                    # warm-up
    _, tel, _ = forward(comm, weights, placement, x, 1, False)
    rows = int(tel.rows_computed.sum())
    run_flops = 4.0 * rows * shape.hidden * shape.ffn / max(tel.seconds["expert"].sum(), 1e-12)
    per_layer = max(1, rows // shape.layers)
    plain = plain_gemm_flops(shape.hidden, shape.ffn, per_layer)
    ratio = comm.allreduce(run_flops / plain, op=MPI.MIN)
    result = {"run_gflops": run_flops / 1e9, "plain_gflops": plain / 1e9, "ratio": ratio}
    echo(f"expert MLP ({shape.name}, H={shape.hidden} F={shape.ffn}, {per_layer} rows/layer): "
         f"run {run_flops / 1e9:.1f} GFLOP/s vs plain numpy GEMM {plain / 1e9:.1f} GFLOP/s "
         f"-> ratio {ratio:.2f} (min over ranks)")
    return result


def bench_exchange(comm, shape: Shape, echo, precision: str = "fp32", repeats: int = 5) -> dict:
    """Dispatch + combine through the Exchanger vs a raw mpi4py Alltoallv of the same bytes.

    Ours includes all the exchange's local work: gathering (and BF16 rounding) the rows,
    decoding, and summing the returned rows into the tokens (the weighted sum).  Timed with
    the benchmarks' local steps (:data:`HOST`: compiled when loaded) and, alternating with
    them, numpy's, so the line also says what the compiled steps save."""
    weights, placement, x = synthetic(comm, shape)
    meta = weights.meta
    layer = weights.layers[0]
    from moempi.model.gating import gate_probs, route
    topk_idx, topk_weights = route(gate_probs(x, layer.gate), meta.top_k)
    dest = assign_replicas(topk_idx, *placement.replica_table(layer.index, comm.rank), comm.rank)
    residual = x.copy()
    kernels = {"numpy": None}
    if HOST.kernels:
        kernels["compiled"] = HOST.kernels
    backend = HostBackend()
    ex = Exchanger(comm, meta.hidden_size, meta.num_experts, precision, blocking=True,
                   backend=backend)
    try:
        plan = drive(ex.plan(topk_idx, dest, sorted(layer.experts)))
        best = {mode: (float("inf"), 0.0) for mode in kernels}   # (ours, its MPI calls' time)
        raw = float("inf")
        itemsize = WIRE_BYTES[precision]
        row = meta.hidden_size * itemsize
        send = np.zeros(plan.num_send * row, np.uint8)
        recv = np.zeros(plan.num_recv * row, np.uint8)
        sc, sd = plan.send_counts.astype(np.int64) * row, plan.send_displs.astype(np.int64) * row
        rc, rd = plan.recv_counts.astype(np.int64) * row, plan.recv_displs.astype(np.int64) * row
        for _ in range(repeats):
            for mode, k in kernels.items():
                backend.kernels = k
                took, mpi = exchange_once(comm, ex, plan, x, residual, topk_weights)
                best[mode] = min(best[mode], (took, mpi))
            comm.Barrier()
            t = time.perf_counter()
            comm.Alltoallv([send, (sc, sd), MPI.BYTE], [recv, (rc, rd), MPI.BYTE])
            comm.Alltoallv([recv, (rc, rd), MPI.BYTE], [send, (sc, sd), MPI.BYTE])
            raw = min(raw, time.perf_counter() - t)
    finally:
        ex.close()
    # the slowest rank's time, and its split into MPI calls and local steps
    best = {mode: comm.allreduce(b, op=MPI.MAX) for mode, b in best.items()}
    raw = comm.allreduce(raw, op=MPI.MAX)
    mode = "compiled" if "compiled" in best else "numpy"
    ours, ours_mpi = best[mode]
    nbytes = comm.allreduce(2 * plan.num_send * meta.hidden_size * itemsize)
    # what the local steps must read and write at least, at this machine's copy rate: the
    # best ratio any implementation of these steps on this memory could reach
    touched = local_bytes(precision, plan.num_send, plan.num_recv, len(x), meta.hidden_size)
    rate = copy_rate(comm, 4 * len(x) * meta.hidden_size)
    floor = comm.allreduce(touched / rate, op=MPI.MAX)
    local = ours - ours_mpi
    result = {"ours_s": ours, "raw_s": raw, "ratio": raw / ours, "bytes": nbytes,
              "mpi_s": ours_mpi, "local_steps": mode,
              "local_s": {m: b[0] - b[1] for m, b in best.items()},
              "local_floor_s": floor, "copy_rate": rate, "ratio_bound": raw / (raw + floor)}
    echo(f"exchange ({shape.name}, {precision}, {nbytes / 2**20:.1f} MiB both ways): dispatch+combine "
         f"{nbytes / ours / 1e9:.2f} GB/s vs raw Alltoallv {nbytes / raw / 1e9:.2f} GB/s "
         f"-> ratio {raw / ours:.3f}")
    echo(f"  its local steps ({LOCAL_STEPS[precision]}) read and write {touched / 2**20:.0f} MiB "
         f"per rank: at this machine's copy rate ({rate / 1e9:.1f} GB/s read+write, all ranks "
         f"copying) at least {floor * 1e3:.1f} ms on top of the raw {raw * 1e3:.1f} ms -> the "
         f"ratio can reach at most {result['ratio_bound']:.2f}")
    echo(f"  ours: {ours_mpi * 1e3:.1f} ms in MPI calls (the raw exchange {raw * 1e3:.1f} ms) and "
         f"{local * 1e3:.1f} ms of local steps ({mode}), {local / floor:.2f} x their bytes at the "
         f"copy rate" + ("" if mode == "numpy" else
                         f"; numpy's steps {result['local_s']['numpy'] * 1e3:.1f} ms, "
                         f"{result['local_s']['numpy'] / floor:.2f} x, ratio "
                         f"{raw / best['numpy'][0]:.3f}"))
    target = EXCHANGE_TARGET[precision]
    allowed = max(raw / target - ours_mpi, 0.0)  # local time the target leaves, at these MPI times
    why = f"at these MPI times it leaves the local steps {allowed * 1e3:.1f} ms, " \
          f"{allowed / floor:.2f} x their bytes at the copy rate; they took {local / floor:.2f} x"
    if allowed < floor:
        why += " (the target asks for less than copying their bytes takes: beyond this machine)"
    echo(verdict(round(result["ratio"], 3) >= target, f">= {target} of the raw exchange", why))
    return result


def exchange_once(comm, ex, plan, x, residual, topk_weights) -> tuple[float, float]:
    """One blocking dispatch + combine with the weighted sum; (seconds, of which in MPI)."""
    comm.Barrier()
    mpi0 = ex.mpi_seconds
    t = time.perf_counter()
    recv = drive(ex.dispatch(plan, x))
    dispatch_s = time.perf_counter() - t
    y = ex.output_buffer(plan)      # the experts' output (not timed: it is compute)
    y = recv.copy() if y is None else np.copyto(y, recv) or y
    comm.Barrier()
    t = time.perf_counter()
    back = drive(ex.combine(plan, y))
    ex.add_weighted(residual, back, plan, topk_weights)  # the rows back into the tokens
    return dispatch_s + time.perf_counter() - t, ex.mpi_seconds - mpi0


LOCAL_STEPS = {"fp32": "gather the rows, weighted sum of the returned rows",
               "bf16": "round to BF16 and gather, widen, round the expert output, weighted "
                       "sum widening the returned rows"}


def local_bytes(precision: str, sent: int, received: int, tokens: int, hidden: int) -> int:
    """Bytes the exchange's local steps read plus write on one rank, at least: each of the
    ``tokens`` rows read once and the ``sent`` rows written to the send buffer, the
    ``received`` rows decoded and their outputs encoded (BF16), and the weighted sum reading
    the returned rows and reading and writing the residual stream's ``tokens`` rows."""
    f32, wire = 4 * hidden, (2 if precision == "bf16" else 4) * hidden
    gather = tokens * f32 + sent * wire
    codec = 2 * received * (f32 + wire) if precision == "bf16" else 0
    weighted = sent * wire + 2 * tokens * f32
    return gather + codec + weighted


def copy_rate(comm, nbytes: int, repeats: int = 5) -> float:
    """Bytes read plus written per second by one large ``np.copyto`` on each rank, all ranks
    copying at once (they share the memory bus); best of ``repeats``."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        comm.Barrier()
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best


def bench_overlap(comm, shape: Shape, echo, micro_batches: int = 4) -> dict:
    """Overlapped (``micro_batches`` in flight) vs blocking layer time, and the overlap %."""
    weights, placement, x = synthetic(comm, shape)
    forward(comm, weights, placement, x, 1, False)          # warm-up: first touch of buffers
    forward(comm, weights, placement, x, micro_batches, True)
    blocking, tel_b, pure = forward(comm, weights, placement, x, 1, False)
    overlapped, tel_o, _ = forward(comm, weights, placement, x, micro_batches, True)
    compute = comm.allreduce(tel_b.seconds["compute"].sum(), op=MPI.MAX)
    pct = _min_overlap(comm, tel_o, pure)
    L = shape.layers
    result = {"blocking_layer_s": blocking / L, "overlapped_layer_s": overlapped / L,
              "compute_layer_s": compute / L, "exchange_layer_s": pure / L,
              "overlapped_vs_blocking": overlapped / blocking,
              "overlapped_vs_ideal": overlapped / max(compute, pure), "overlap_pct": pct,
              "micro_batches": micro_batches}
    echo(f"overlap ({shape.name}, H={shape.hidden} F={shape.ffn}, {shape.tokens} tokens/rank, "
         f"{micro_batches} micro-batches): per layer blocking {blocking / L * 1e3:.1f} ms, "
         f"overlapped {overlapped / L * 1e3:.1f} ms, compute alone {compute / L * 1e3:.1f} ms, "
         f"exchange alone {pure / L * 1e3:.1f} ms")
    echo(f"  overlapped/blocking {result['overlapped_vs_blocking']:.2f}, overlapped/max(compute, "
         f"exchange) {result['overlapped_vs_ideal']:.2f} (1.0 = perfect), overlap {pct:.0f} % "
         f"(OSU, min over ranks)")
    return result


def bench_micro_batches(comm, shape: Shape, echo, repeats: int = 4) -> dict:
    """The start-up choice of the micro-batch count (``moempi run``'s, :mod:`runtime.tune`)
    against every fixed count, and the layer time over the plain-GEMM compute floor.

    Each fixed count runs the whole pass (best of ``repeats``, slowest rank); the automatic
    choice is what ``tune.time_micro_batches`` picks on the same weights and tokens.  The
    floor is the slowest rank's expert rows at the plain numpy GEMM rate of that many rows.
    """
    weights, placement, x = synthetic(comm, shape)
    meta = weights.meta
    chunk, _, _ = tune.chunk_rows(meta, comm)
    counts = tune.candidates(len(x), 16)
    forward(comm, weights, placement, x, max(counts), True, chunk_rows=chunk, replay=False)
    passes = {m: [] for m in counts}
    for r in range(repeats):
        for m in counts if r % 2 == 0 else reversed(counts):
            t, tel, _ = forward(comm, weights, placement, x, m, True, chunk_rows=chunk,
                                replay=False)
            passes[m].append(t)
    fixed = {m: min(ts) for m, ts in passes.items()}
    # the automatic choice as `moempi run` makes it: on the pass's own layers (a job of this
    # many MoE layers), its whole pass timed, trial layers included (best of `repeats`)
    tuned = []
    for _ in range(repeats):
        ctx = _context(comm, weights, placement, chunk)
        exchangers = [Exchanger(comm, meta.hidden_size, meta.num_experts, "fp32", backend=HOST)
                      for _ in range(max(counts))]
        try:
            comm.Barrier()
            t = time.perf_counter()
            _, tuning = tune.tuned_batch(comm, ctx, exchangers, x.copy(), 0, counts,
                                         shape.layers)
            tuned.append((comm.allreduce(time.perf_counter() - t, op=MPI.MAX), tuning))
        finally:
            for ex in exchangers:
                ex.close()
    auto_s, tuning = min(tuned, key=lambda run: run[0])
    auto = tuning.chosen
    best = min(fixed, key=fixed.get)
    rows = int(tel.rows_computed.sum())                   # this rank's expert rows, all layers
    comm.Barrier()                  # every rank's GEMM at once, as in the layer (best of 5)
    floor = 4.0 * rows * meta.hidden_size * meta.moe_ffn_size / plain_gemm_flops(
        meta.hidden_size, meta.moe_ffn_size, max(1, rows // shape.layers), repeats=5)
    floor = comm.allreduce(floor, op=MPI.MAX)
    # where the layer's time beyond the floor goes, at the chosen count: the busiest rank's
    # telemetry of the fastest of 3 more passes, and its exchanges replayed without compute
    t, tel, alone = min((forward(comm, weights, placement, x, auto, True, chunk_rows=chunk)
                         for _ in range(3)), key=lambda run: run[0])
    sec = {k: v.sum() for k, v in tel.seconds.items()}
    parts = {"expert": sec["expert"], "gate": sec["gate"],
             "exchange local work": sec["compute"] - sec["gate"] - sec["expert"],  # pack + sum
             "MPI calls": sec["busy"] - sec["compute"], "waiting on exchanges": sec["wait"]}
    busiest = comm.allreduce((sec["busy"], comm.rank), op=MPI.MAXLOC)[1]  # the others wait for it
    parts = comm.bcast(parts, root=busiest)
    result = {"fixed_s": fixed, "auto": auto, "best": best, "chunk_rows": chunk,
              "auto_vs_best": auto_s / fixed[best], "auto_s": auto_s,
              "tuning_cost_s": tuning.cost_s,
              "layer_vs_floor": fixed[auto] / floor, "floor_s": floor, "breakdown_s": parts,
              "exchange_alone_s": alone}
    echo(f"micro-batches ({shape.name}, H={shape.hidden} F={shape.ffn}, {shape.tokens} "
         f"tokens/rank, {shape.layers} MoE layer(s), GEMM chunk {chunk} rows): " + ", ".join(
             f"{m}: {t * 1e3:.1f} ms" for m, t in fixed.items()))
    echo(f"  auto {auto} (the whole pass with its trial layers {auto_s * 1e3:.1f} ms, the "
         f"tuning's cost {tuning.cost_s * 1e3:.1f} ms: {tuning.reason}), best fixed {best} "
         f"({fixed[best] * 1e3:.1f} ms) -> auto/best {result['auto_vs_best']:.3f}; layer time "
         f"over the plain-GEMM floor ({floor * 1e3:.1f} ms) {result['layer_vs_floor']:.3f}")
    echo(f"  where it goes (busiest rank, fastest of 3 more passes at {auto}: {t * 1e3:.1f} ms): " +
         ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in parts.items()) +
         f"; beyond the floor: {(t - floor) * 1e3:.1f} ms")
    spread = max(passes[best]) / fixed[best] - 1
    echo(verdict(round(result["auto_vs_best"], 3) <= AUTO_TARGET, f"auto/best <= {AUTO_TARGET}",
                 f"the best count's own {repeats} passes spread by {spread:.1%}"))
    if shape.layer_target:
        # with one core per rank the gate and the exchange's local steps add to the GEMMs;
        # the exchange's copies, timed alone, can hide only behind another rank's work
        cpu = (parts["gate"] + parts["exchange local work"]) / floor
        why = (f"the target leaves {shape.layer_target - 1:.2f} x the floor beyond it; in the "
               f"breakdown's pass the expert took {parts['expert'] / floor:.2f} x the floor, "
               f"the gate and the exchange's local work (one core per rank: they add to the "
               f"GEMMs) {cpu:.2f} x, waiting {parts['waiting on exchanges'] / floor:.2f} x; "
               f"the exchange's copies alone (replayed without compute) take "
               f"{alone / floor:.2f} x")
        echo(verdict(round(result["layer_vs_floor"], 3) <= shape.layer_target,
                     f"layer/floor <= {shape.layer_target}", why))
    return result


def bench_tp_sum(comm, echo, hidden: int = 7168, tokens: int = 256, top_k: int = 2,
                 tp: int = 2, repeats: int = 5) -> dict:
    """Where to sum an expert's tensor-parallel partial outputs, measured (``parallel.tp``).

    Implemented: every shard returns its partial rows through the combine and the token's
    home rank sums them in the weighted sum; the cost over tp = 1 is the extra partial rows,
    ``(tp - 1) * tokens * top_k`` rows per rank each way of the exchange (timed here as the
    extra ``Alltoallv``).  The alternative, a sum inside the tensor-parallel group, keeps the
    combine as it is but needs each group to share its tokens and adds an ``Allreduce`` of
    the ``tp * tokens`` rows the group owns, per MoE layer (timed here on groups of ``tp``
    consecutive ranks).  Both are raw MPI on the same bytes; times are the slowest rank's.
    """
    P = comm.size
    row = hidden * 4
    group = comm.Split(comm.rank // tp, comm.rank)
    extra = (tp - 1) * tokens * top_k                     # extra partial rows sent per rank
    send = np.ones(extra * row // 4, np.float32)
    recv = np.empty_like(send)
    counts = np.full(P, extra // P * row, np.int64)
    counts[-1] += extra * row - counts.sum()
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rows = np.ones((tp * tokens, hidden), np.float32)
    out = np.empty_like(rows)

    def best(fn):
        t_best = float("inf")
        for _ in range(repeats):
            comm.Barrier()
            t = time.perf_counter()
            fn()
            t_best = min(t_best, time.perf_counter() - t)
        return comm.allreduce(t_best, op=MPI.MAX)

    try:
        combine = best(lambda: comm.Alltoallv([send, (counts, displs), MPI.BYTE],
                                              [recv, (counts, displs), MPI.BYTE]))
        reduce = best(lambda: group.Allreduce(rows, out, op=MPI.SUM))
    finally:
        group.Free()
    echo(f"tp sum ({P} ranks, tp={tp}, H={hidden}, {tokens} tokens/rank, top-{top_k}): partial "
         f"rows back through the combine (implemented) {combine * 1e3:.2f} ms extra per layer, "
         f"vs a sum in the tensor-parallel group {reduce * 1e3:.2f} ms (Allreduce of the "
         f"group's {tp * tokens} rows) -> combine/reduce {combine / reduce:.2f}")
    return {"combine_s": combine, "reduce_s": reduce}


def routed_stack(comm, routing: str, hidden: int, ffn: int, tokens: int, seed: int = 0):
    """:func:`synthetic` with one expert per rank and a gate that routes as named:
    ``skewed`` (token clusters drawn Zipf-like, each cluster preferring one expert) or
    ``co-activating`` (cluster ``c``'s tokens choose experts ``2c`` and ``2c+1`` together,
    which the default placement puts on neighbouring ranks, so on one node)."""
    weights, placement, _ = synthetic(comm, Shape(routing, hidden, ffn, tokens, 1), seed)
    E, H = weights.meta.num_experts, hidden
    shared = np.random.default_rng([seed, 99])
    clusters = E // 2 if routing == "co-activating" else E
    centre = shared.standard_normal((clusters, H)).astype(np.float32)
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    gate = np.empty((H, E), np.float32)
    for e in range(E):
        gate[:, e] = centre[e // 2 if routing == "co-activating" else e] * 8.0
    gate += shared.standard_normal((H, E)).astype(np.float32) * 0.05
    rng = np.random.default_rng([seed, comm.rank, 7])
    if routing == "co-activating":
        pick = rng.integers(0, clusters, tokens)
    else:
        p = 1.0 / np.arange(1, clusters + 1) ** 1.2
        pick = rng.choice(clusters, tokens, p=p / p.sum())
    x = (centre[pick] * 3.0 + rng.standard_normal((tokens, H)).astype(np.float32) * 0.3)
    weights.layers[0].gate[...] = gate
    return weights, placement, x.astype(np.float32)


def bench_node_dispatch(comm, echo, gpus_per_node: int = 8, hidden: int = 256,
                        ffn: int = 128, tokens: int = 64, repeats: int = 3) -> dict:
    """Direct against node-deduplicated dispatch on ``comm.size // gpus_per_node`` nodes: the
    rows and bytes crossing nodes (dispatch and combine) and one MoE layer's time."""
    nodes = comm.size // gpus_per_node
    results = {}
    echo(f"| {nodes} x {gpus_per_node} ranks | routing | inter-node rows direct / node | "
         f"MiB direct / node | reduction | layer ms direct / node |")
    echo("| --- | --- | --- | --- | --- | --- |")
    for routing in ("skewed", "co-activating"):
        weights, placement, x = routed_stack(comm, routing, hidden, ffn, tokens)
        row = {}
        for mode, gpn in (("direct", 0), ("node", gpus_per_node)):
            forward(comm, weights, placement, x, 1, True, replay=False, gpus_per_node=gpn)
            best = float("inf")
            for _ in range(repeats):
                t, tel, _ = forward(comm, weights, placement, x, 1, True, replay=False,
                                    gpus_per_node=gpn)
                best = min(best, t)
            sent = tel.traffic.sum(axis=0)                      # rows to each rank [P]
            mine = comm.rank // gpus_per_node
            remote = int(sent[np.arange(comm.size) // gpus_per_node != mine].sum())
            rows = comm.allreduce(remote)
            row[mode] = {"rows": rows, "bytes": 2 * rows * hidden * 4, "layer_s": best}
        cut = 1 - row["node"]["rows"] / max(row["direct"]["rows"], 1)
        results[routing] = {**row, "reduction": cut}
        echo(f"| {nodes} x {gpus_per_node} | {routing} | {row['direct']['rows']} / "
             f"{row['node']['rows']} | {row['direct']['bytes'] / 2**20:.1f} / "
             f"{row['node']['bytes'] / 2**20:.1f} | {cut:.0%} | "
             f"{row['direct']['layer_s'] * 1e3:.1f} / {row['node']['layer_s'] * 1e3:.1f} |")
    return results


def comm_heavy_ffn(comm, hidden: int, tokens: int) -> int:
    """The expert hidden size F at which one layer's compute takes about as long as its exchange."""
    latency, bandwidth = probe_network(comm, hidden, 4)
    exchange_s = 2 * (latency + 2 * tokens * hidden * 4 / bandwidth)
    flops = comm.bcast(plain_gemm_flops(hidden, 256, 2 * tokens), root=0)
    ffn = int(exchange_s * flops / (4 * 2 * tokens * hidden))
    return int(max(16, min(2048, 16 * round(ffn / 16))))


def calibrate(comm, echo, path: str | None) -> dict:
    """GEMM rate and Alltoallv latency/bandwidth of this machine, for ``moempi plan --hardware``."""
    flops = comm.allreduce(plain_gemm_flops(7168, 2048, 256), op=MPI.MIN)
    latency, bandwidth = probe_network(comm, 7168, 2, rows=64)
    machine = (f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip()
               + f", {comm.size} ranks")
    cal = Calibration.from_measurements(flops, {comm.size: (latency, bandwidth)}, machine)
    echo(f"calibration: GEMM {flops / 1e9:.1f} GFLOP/s per rank, Alltoallv latency "
         f"{latency * 1e6:.0f} us, bandwidth {bandwidth / 1e9:.2f} GB/s per rank")
    if path and comm.rank == 0:
        cal.save(path)
        echo(f"wrote {path}")
    return cal.to_dict()


# -- GPU ------------------------------------------------------------------------------
def _device_weights(backend, shape, scale, dtype):
    """Random weights made on the device (host RNG for the stand-in), stored as ``dtype``."""
    if backend.name == "cupy":
        cp = backend.cp
        with backend.running():
            return (cp.random.standard_normal(shape, dtype=cp.float32) * scale).astype(dtype)
    rng = np.random.default_rng(len(shape) + shape[0])
    return backend.to_device(rng.standard_normal(shape).astype(np.float32) * scale, dtype)


def _gpu_time(backend, fn, repeats: int = 5) -> float:
    """Best wall time of ``fn`` with the GPU's queues drained before and after."""
    best = float("inf")
    for _ in range(repeats):
        backend.synchronize()
        t = time.perf_counter()
        with backend.running():
            fn()
        backend.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def gpu_weights(backend, meta: ModelMeta, experts_here) -> Weights:
    """A full stack on one device: dense layers, gates, and ``experts_here`` experts per layer."""
    import ml_dtypes
    from moempi.model.stack import DenseLayer
    H, F, Fd, E = meta.hidden_size, meta.moe_ffn_size, meta.dense_ffn_size, meta.num_experts
    layers, bf16 = [], ml_dtypes.bfloat16
    for l in range(meta.num_layers):
        norm = backend.to_device(np.ones(H, np.float32))
        if not meta.is_moe(l):
            layers.append(DenseLayer(l, norm, _device_weights(backend, (H, Fd), H**-0.5, bf16),
                                     _device_weights(backend, (Fd, H), Fd**-0.5, bf16)))
            continue
        layer = MoeLayer(l, norm, _device_weights(backend, (H, E), 2 * H**-0.5, np.float32))
        for e in experts_here:
            layer.experts[e] = (_device_weights(backend, (H, F), H**-0.5, bf16),
                                _device_weights(backend, (F, H), F**-0.5, bf16))
        layers.append(layer)
    return Weights(meta, layers, None)


def bench_gpu(comm, backend_name: str, echo, quick: bool = False) -> dict:
    """The GPU table: expert MLP vs plain BF16 matmul, 61-layer forward on one GPU, overlap.

    Rank 0 measures the single-GPU figures alone; then all ranks (sharing the GPU, or one
    GPU each) run the overlapped and blocking forward for the overlap %.
    """
    from moempi.runtime.backend import make_backend
    import ml_dtypes
    backend = make_backend(backend_name, comm)
    bf16 = ml_dtypes.bfloat16
    H, F, Fd, rows = (256, 128, 384, 512) if quick else (7168, 2048, 18432, 8192)
    result = {"device": backend.describe()}
    if comm.rank == 0:
        with backend.running():
            hb = _device_weights(backend, (rows, H), 1.0, bf16)
            w_in = _device_weights(backend, (H, F), H**-0.5, bf16)
            w_out = _device_weights(backend, (F, H), F**-0.5, bf16)
            a = hb @ w_in
        # the expert MLP as the forward runs it (BF16 in and out, fused activation) against
        # the two plain BF16 matmuls alone
        ours = _gpu_time(backend, lambda: backend.mlp(hb, w_in, w_out, "silu"))
        plain = _gpu_time(backend, lambda: (hb @ w_in, a @ w_out))
        flop = 4.0 * rows * H * F
        result.update(expert_tflops=flop / ours / 1e12, plain_tflops=flop / plain / 1e12,
                      expert_ratio=plain / ours)
        echo(f"| expert MLP (BF16, {rows} x {H} x {F}) | {flop / ours / 1e12:.1f} TFLOP/s | "
             f"plain BF16 matmul {flop / plain / 1e12:.1f} TFLOP/s | ratio {plain / ours:.2f} |")
        layers, dense = (6, 1) if quick else (61, 3)
        meta = ModelMeta(hidden_size=H, moe_ffn_size=F, dense_ffn_size=Fd, num_layers=layers,
                         num_dense_layers=dense, num_experts=8, has_final_norm=False)
        weights = gpu_weights(backend, meta, range(8))
        single = MPI.COMM_SELF
        placement = Placement.default(8, 1, meta.moe_layers)
        x = np.random.default_rng(0).standard_normal((rows, H)).astype(np.float32)
        tel = Telemetry(layers, layers - dense, 1, 8)
        ctx = Context(weights, placement, 0, 0, np.zeros((layers - dense, 8), np.float32), tel,
                      Scheduler(tel), backend)
        exchangers = [Exchanger(single, H, 8, "bf16", blocking=False, backend=backend)
                      for _ in range(2)]
        try:
            run_batch(ctx, exchangers, x[:64], 0, 0)                     # warm-up
            backend.synchronize()
            t = time.perf_counter()
            run_batch(ctx, exchangers, x, 0, 1)
            backend.synchronize()
            forward = time.perf_counter() - t
        finally:
            for ex in exchangers:
                ex.close()
        # the compute floor: the stack's GEMM FLOPs (top-k experts per token, dense MLPs,
        # gates) at the plain BF16 matmul rate measured above
        flop_token = 4.0 * H * (dense * Fd + (layers - dense) * meta.top_k * F) + \
            2.0 * H * 8 * (layers - dense)
        floor = rows * flop_token / (flop / plain)
        result.update(forward_tokens_per_s=rows / forward, forward_floor_ratio=floor / forward)
        echo(f"| {layers}-layer forward, one GPU (8 experts, bf16) | {rows / forward:,.0f} "
             f"tokens/s | {forward * 1e3:.1f} ms for {rows} tokens | {floor / forward:.2f} of "
             f"the compute floor ({floor * 1e3:.1f} ms) |")
        del weights
    comm.Barrier()
    shape = Shape("gpu", H, F, rows // max(comm.size, 1) // (8 if not quick else 1), 4)
    weights, placement, x = synthetic(comm, shape)
    weights = Weights(weights.meta, [
        MoeLayer(l.index, backend.to_device(l.norm), backend.to_device(l.gate),
                 {e: (backend.to_device(a, bf16), backend.to_device(b, bf16))
                  for e, (a, b) in l.experts.items()}) for l in weights.layers], None)
    pct = _overlap_percent(comm, backend, weights, placement, x)
    result["overlap_pct"] = pct
    echo(f"| overlap, {comm.size} ranks on {backend.describe()} | {pct:.0f} % | OSU definition | |")
    return result


def _overlap_percent(comm, backend, weights, placement, x, micro_batches: int = 4) -> float:
    """The overlapped pass's overlap % (min over ranks), after a blocking pass as warm-up."""
    meta = weights.meta
    for overlap in (False, True):
        tel = Telemetry(meta.num_layers, meta.num_layers, comm.size, meta.num_experts)
        ctx = Context(weights, placement, comm.rank, 0,
                      np.zeros((meta.num_layers, meta.num_experts), np.float32), tel,
                      Scheduler(tel), backend)
        exchangers = [Exchanger(comm, meta.hidden_size, meta.num_experts, "bf16",
                                blocking=not overlap, backend=backend)
                      for _ in range(micro_batches if overlap else 1)]
        try:
            comm.Barrier()
            run_batch(ctx, exchangers, x, 0, 0)
            backend.synchronize()
            pure = sum(exchangers[0].replay(tel.exchanges_of(m)) for m in range(meta.num_layers))
        finally:
            for ex in exchangers:
                ex.close()
    return _min_overlap(comm, tel, pure)


def _min_overlap(comm, tel: Telemetry, pure_s: float) -> float:
    """The OSU overlap % of a pass (:func:`output.overlap_percent` over its layers' sums),
    min over ranks."""
    overall = tel.seconds["busy"].sum() + tel.seconds["wait"].sum()
    pct = float(overlap_percent(overall, tel.seconds["compute"].sum(), pure_s))
    return comm.allreduce(pct, op=MPI.MIN)


# -- load balancing ---------------------------------------------------------------------
def bench_balance(comm, echo, quick: bool = False, rate: float = 0.05) -> dict:
    """MaxVio before/after bias balancing on a skewed gate, and what it does to the run time.

    The gate is skewed on purpose: every token shares a direction that expert 0 (and, less,
    expert 1) favours, so without balancing their ranks compute far more rows than the rest.
    """
    from moempi.io.config import BalanceSection
    from moempi.model.balance import BiasBalancer, max_violation
    H, F, tokens, batch = (256, 256, 1024, 64) if quick else (1024, 1024, 4096, 256)
    shape = Shape("skewed", H, F, tokens, 4)
    weights, placement, x = synthetic(comm, shape, seed=3)
    for layer in weights.layers:
        layer.gate[0, 0] += 1.0
        layer.gate[0, 1] += 0.5
    x[:, 0] += 4.0
    meta = weights.meta
    results = {}
    for enabled in (False, True):
        balancer = BiasBalancer(BalanceSection(enabled=enabled, rate=rate), meta.num_layers,
                                meta.num_experts)
        tel = Telemetry(meta.num_layers, meta.num_layers, comm.size, meta.num_experts)
        ctx = Context(weights, placement, comm.rank, 0, balancer.bias, tel, Scheduler(tel),
                      HostBackend())
        exchangers = [Exchanger(comm, H, meta.num_experts, "fp32") for _ in range(2)]
        vio = []
        try:
            comm.Barrier()
            t = time.perf_counter()
            for b, start in enumerate(range(0, tokens, batch)):
                before = tel.tokens_per_expert.copy()
                run_batch(ctx, exchangers, x[start:start + batch], start, b)
                load = np.empty_like(before)
                comm.Allreduce(tel.tokens_per_expert - before, load)
                balancer.update(load)
                vio.append(float(max_violation(load).mean()))
            elapsed = comm.allreduce(time.perf_counter() - t, op=MPI.MAX)
        finally:
            for ex in exchangers:
                ex.close()
        results[enabled] = {"maxvio_first": vio[0], "maxvio_last": float(np.mean(vio[-2:])),
                            "seconds": elapsed}
    off, on = results[False], results[True]
    echo(f"balance ({comm.size} ranks, {meta.num_experts} experts, skewed gate, "
         f"{tokens // batch} batches, rate {rate}): MaxVio off {off['maxvio_first']:.2f} -> "
         f"{off['maxvio_last']:.2f}, on {on['maxvio_first']:.2f} -> {on['maxvio_last']:.2f}; "
         f"time on/off {on['seconds'] / off['seconds']:.2f} "
         f"({on['seconds']:.2f} s vs {off['seconds']:.2f} s)")
    return {"off": off, "on": on, "time_ratio": on["seconds"] / off["seconds"]}
