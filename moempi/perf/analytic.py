"""Analytic time model of the moempi forward pass: compute, exchange, micro-batch overlap."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from moempi.errors import MoempiError
from moempi.io.readers import read_json
from moempi.io.topology import Topology
from moempi.model.shapes import ModelMeta
from moempi.perf.memory import experts_per_gpu, memory_per_gpu, smallest_fitting_tp
from moempi.perf.tuning import candidates
from moempi.perf.tuning import simulate as simulate_tuning

# FLOPs of one (token, expert) pair in the expert MLP act(h @ Win) @ Wout: two GEMMs of
# H x F, 2 FLOPs per multiply-add (Kaplan et al. 2020, "Scaling Laws", C_forward = 2N); a
# gated MLP (act(h @ Wg) * (h @ Win)) @ Wout has three (the elementwise product is O(F)).
def expert_flops_per_pair(meta: ModelMeta) -> int:
    """FLOPs of one (token, expert) pair: ``2 * Me * H * F`` with Me = 2 matrices plain, 3
    gated (DeepSeek-V3: 58.7 MFLOP plain, 88.1 MFLOP gated)."""
    return 2 * meta.expert_matrices * meta.hidden_size * meta.moe_ffn_size


def shared_flops_per_token(meta: ModelMeta) -> int:
    """FLOPs of the shared expert for one token: ``2 * Me * H * Fs``, plus ``2 * H`` for
    Qwen2-MoE's ``shared_gate`` [H, 1]; 0 without a shared expert (DeepSeek-V3: 88.1 MFLOP)."""
    if not meta.shared_ffn_size:
        return 0
    return 2 * meta.hidden_size * (meta.expert_matrices * meta.shared_ffn_size
                                   + int(meta.shared_expert_gate))


EXCHANGE_PHASES = 3     # per micro-batch per MoE layer: counts exchange, dispatch, combine
NODE_PHASES = 7         # node dispatch: counts, rows, routing (stage 1); counts, rows (stage 2);
                        # combine inside the node, then across (docs/design.md §3)
COMBINE_PHASES = {EXCHANGE_PHASES: 1, NODE_PHASES: 2}   # of those, the combine's; the rest dispatch
WIRE_BYTES = {"bf16": 2, "fp32": 4}   # docs/design.md §1: BF16 on the wire (production), fp32 (exact)

# Bytes per weight element as the GEMM reads it: the numpy backend keeps weights in float32.
# Used only with a measured ``weight_Bps`` (each MLP call streams its two or three matrices).
COMPUTE_WEIGHT_BYTES = 4

CALIBRATION_FORMAT = "moempi-calibration"
# one calibration process's figures at one rank count (Calibration.samples)
SAMPLE_FIELDS = ("latency_s", "bandwidth_Bps", "gemm_flops", "weight_Bps", "token_elem_s",
                 "micro_batch_s", "first_touch_s", "dense_elem_s", "dense_touch_s",
                 "first_touch_head", "copy_elem_s", "copy_bf16_elem_s", "overlap_micro_s")
CPU_FIELDS = SAMPLE_FIELDS[2:]     # a Calibration.cpu row after its rank count
CALIBRATION_VERSION = 1


# -- hardware -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    """The figures the time model uses, from a topology's datasheet or a calibration file."""

    gemm_flops: float          # achieved expert-GEMM FLOP/s of one GPU (peak x MFU, or measured)
    latency_s: float           # one exchange phase's latency, s (seed: 100 us per transfer)
    intra_Bps: float           # achievable B/s of one GPU's intra-node port, each direction
    inter_Bps: float           # achievable B/s of one inter-node link, each direction
    link: str                  # "fat-tree" | "direct" | "measured" (one per-rank Alltoallv figure)
    gpus_per_node: int
    memory_bytes: float        # memory per GPU, B
    source: str = "seed"       # where the figures come from
    # CPU-scale terms, measured by calibration; 0 = not modelled (the datasheet/seed case,
    # where they are negligible next to a GPU layer's milliseconds):
    weight_Bps: float = 0.0    # B/s at which one GEMM call streams (packs) its weights: a fixed
                               # 2*H*F*4 B / weight_Bps per call, what makes small GEMMs slow
    token_elem_s: float = 0.0  # s per token per hidden element of a MoE layer's non-GEMM work:
                               # norm, softmax/top-k, gather + encode/decode, un-permute, combine
    micro_batch_s: float = 0.0  # s per micro-batch per MoE layer: routing plan, Python, scheduler
    first_touch_s: float = 0.0  # s per (token, expert) pair element a run's first forward pass
                                # adds, once: a fresh process pages its working set in
                                # (moempi.runtime.heap; shared over the MoE layers, touch_shares)
    first_touch_head: float = 0.0  # share of that first touch in the first MoE layer, the rest
                                   # even over the others; 0 = all even (see touch_shares)
    dense_elem_s: float = 0.0  # s per token per (H + Fd) element of a dense layer's non-GEMM
                               # work: rmsnorm and residual add over [T, H], activation over
                               # [T, Fd] (see dense_layer_time)
    dense_touch_s: float = 0.0  # s per token per (H + Fd) element the first dense layer of a
                                # fresh process's first pass adds: its temporaries paged in
    copy_elem_s: float = 0.0   # s per element of the exchange's local copies, fp32 wire: per
                               # row sent or received, H elements (gather into the send
                               # buffer, weighted sum of the returned rows; measured alone)
    copy_bf16_elem_s: float = 0.0   # the same with BF16 on the wire (rounding and widening)
    overlap_micro_s: float = 0.0    # s per micro-batch per MoE layer that the overlapped
                                    # exchange costs beyond the blocking one on a host whose
                                    # cores do the MPI copies (chunked GEMMs, polls, interleaved
                                    # micro-batches); measured link only
    gemm_shapes: tuple = ()    # ((H, F, factor), ...): the expert MLP's rate at shape (H, F)
                               # over its rate at the calibration's shape, measured; () = 1

    def rate(self, hidden: int, ffn: int) -> float:
        """The GEMM rate of an MLP of shape (H, F): ``gemm_flops`` x the measured factor of
        that shape (bilinear in log2 H, log2 F between the measured shapes, clamped)."""
        return self.gemm_flops * shape_factor(self.gemm_shapes, hidden, ffn)

    @classmethod
    def from_topology(cls, topo: Topology, source: str = "topology") -> "Hardware":
        """Datasheet figures derated: rate = peak x MFU (nanoGPT estimate_mfu; PaLM App. B),
        bandwidth = link x utilisation."""
        return cls(gemm_flops=topo.peak_tflops * 1e12 * topo.mfu,
                   latency_s=topo.latency_us * 1e-6,
                   intra_Bps=topo.intra_node_bandwidth_gbs * 1e9 * topo.utilisation,
                   inter_Bps=topo.inter_node_bandwidth_gbs * 1e9 * topo.utilisation,
                   link=topo.link, gpus_per_node=topo.gpus_per_node,
                   memory_bytes=topo.gpu_memory_gb * 1e9, source=source)


def shape_factor(table, hidden: int, ffn: int) -> float:
    """``table`` ``((H, F, factor), ...)`` on a full grid of H x F, at ``(hidden, ffn)``:
    bilinear in (log2 H, log2 F), clamped to the grid; 1 for an empty table."""
    if not table:
        return 1.0
    hs = sorted({h for h, _, _ in table})
    fs = sorted({f for _, f, _ in table})
    grid = {(h, f): v for h, f, v in table}
    lf = np.log2(fs)
    by_h = [float(np.interp(math.log2(max(ffn, 1)), lf, [grid[h, f] for f in fs])) for h in hs]
    return float(np.interp(math.log2(max(hidden, 1)), np.log2(hs), by_h))


@dataclass(frozen=True)
class Calibration:
    """Figures measured by ``moempi bench`` on one machine, saved as JSON.

    ``alltoall`` holds ``(num_ranks, latency_s, bandwidth_Bps)`` rows sorted by rank count:
    the latency of an (almost) empty Alltoallv and the per-rank bandwidth of a large one.
    ``cpu`` (optional, from ``perf_validate.calibrate``) holds ``(num_ranks, gemm_flops,
    weight_Bps, token_elem_s, micro_batch_s, first_touch_s, dense_elem_s, dense_touch_s,
    first_touch_head)``
    rows (:data:`CPU_FIELDS`) measured with all ranks computing at once
    (so more ranks than cores shows up as a lower rate); where present it replaces
    ``gemm_flops`` and adds the small-scale terms of :class:`Hardware`.
    ``samples`` holds ``(num_ranks, ((latency_s, bandwidth_Bps, gemm_flops, ...), ...))``
    (:data:`SAMPLE_FIELDS`): one row per calibration process
    at that rank count; where there are several, the ``alltoall`` and ``cpu`` rows are
    their per-figure medians (:data:`SAMPLE_FIELDS`; one process alone can be disturbed, and
    its single cold pass is a noisy sample of ``first_touch_s``).
    """

    machine: str
    gemm_flops: float                              # achieved GEMM FLOP/s of one rank
    gemm_dtype: str
    alltoall: tuple[tuple[int, float, float], ...]
    cpu: tuple[tuple[float, ...], ...] = ()       # (num_ranks, *CPU_FIELDS) rows
    samples: tuple[tuple[int, tuple[tuple[float, ...], ...]], ...] = ()
    # ((H, F, (factor, ...)), ...): each calibration process's measured expert-MLP rate at
    # (H, F) over its rate at the calibration shape (measure.validate.measure_shapes); the
    # model uses the median per shape (Hardware.gemm_shapes)
    gemm_shapes: tuple = ()

    @classmethod
    def from_measurements(cls, gemm_flops: float, alltoall: dict[int, tuple[float, float]],
                          machine: str, gemm_dtype: str = "float32",
                          cpu: dict[int, tuple] | None = None,
                          samples: dict[int, list] | None = None,
                          source: str = "calibration",
                          gemm_shapes: dict | None = None) -> "Calibration":
        """``alltoall`` maps a rank count to ``(latency_s, bandwidth_Bps per rank)``; ``cpu``
        a rank count to ``(gemm_flops, weight_Bps, token_elem_s, micro_batch_s[,
        first_touch_s, dense_elem_s, dense_touch_s, first_touch_head])`` (0 those left out);
        ``samples`` a rank count to its
        calibration processes' rows of :data:`SAMPLE_FIELDS` (kept as given); ``source``
        names the file in errors."""
        rows = tuple(sorted((int(n), float(lat), float(bw)) for n, (lat, bw) in alltoall.items()))
        cpu_rows = tuple(sorted((int(n), *_padded(v, len(CPU_FIELDS)))
                                for n, v in (cpu or {}).items()))
        sample_rows = tuple(sorted((int(n), tuple(_padded(r, len(SAMPLE_FIELDS)) for r in v))
                                   for n, v in (samples or {}).items() if len(v)))
        shapes = tuple(sorted((int(h), int(f), tuple(map(float, v)))
                              for (h, f), v in (gemm_shapes or {}).items() if len(v)))
        return cls(str(machine), float(gemm_flops), str(gemm_dtype), rows, cpu_rows,
                   sample_rows, shapes).validate(source)

    def validate(self, source: str = "calibration") -> "Calibration":
        if not self.gemm_flops > 0:
            raise MoempiError(f"{source}: gemm_flops must be > 0")
        if not self.alltoall:
            raise MoempiError(f"{source}: alltoall needs at least one rank count")
        for n, lat, bw in self.alltoall:
            if n < 1 or lat < 0 or not bw > 0:
                raise MoempiError(f"{source}: alltoall[{n}] needs ranks >= 1, latency_s >= 0, "
                                  f"bandwidth_Bps > 0")
        for n, flops, *rest in self.cpu:
            if n < 1 or not flops > 0 or min(rest) < 0:
                raise MoempiError(f"{source}: cpu[{n}] needs ranks >= 1, gemm_flops > 0, "
                                  f"{', '.join(CPU_FIELDS[1:])} >= 0")
        for n, rows in self.samples:
            if any(len(r) != len(SAMPLE_FIELDS) or min(r) < 0 for r in rows):
                raise MoempiError(f"{source}: samples[{n}] needs rows of "
                                  f"{', '.join(SAMPLE_FIELDS)} >= 0")
        return self

    def alltoall_at(self, num_ranks: int) -> tuple[float, float]:
        """(latency_s, bandwidth_Bps) at ``num_ranks``: measured, else linear in log2(ranks)
        between the neighbouring measurements, clamped to the measured range."""
        return _interp_rows(self.alltoall, num_ranks)

    def cpu_at(self, num_ranks: int) -> tuple[float, ...]:
        """The :data:`CPU_FIELDS` (gemm_flops, weight_Bps, token_elem_s, ...) at
        ``num_ranks``, interpolated like :meth:`alltoall_at`; without ``cpu`` rows:
        ``(gemm_flops, 0, ...)``."""
        if not self.cpu:
            return (self.gemm_flops,) + (0.0,) * (len(CPU_FIELDS) - 1)
        return _interp_rows(self.cpu, num_ranks)

    def hardware(self, num_ranks: int, topo: Topology) -> Hardware:
        """Measured figures at ``num_ranks``; GPUs per node and memory from ``topo``."""
        latency, bandwidth = self.alltoall_at(num_ranks)
        shapes = tuple((h, f, float(np.median(v))) for h, f, v in self.gemm_shapes)
        return Hardware(latency_s=latency, intra_Bps=bandwidth,
                        inter_Bps=bandwidth, link="measured", gpus_per_node=topo.gpus_per_node,
                        memory_bytes=topo.gpu_memory_gb * 1e9, source=f"calibration: {self.machine}",
                        gemm_shapes=shapes, **dict(zip(CPU_FIELDS, self.cpu_at(num_ranks))))

    def to_dict(self) -> dict:
        return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION,
                "machine": self.machine, "gemm_flops": self.gemm_flops,
                "gemm_dtype": self.gemm_dtype,
                "alltoall": {str(n): {"latency_s": lat, "bandwidth_Bps": bw}
                             for n, lat, bw in self.alltoall},
                **({"cpu": {str(n): dict(zip(CPU_FIELDS, rest)) for n, *rest in self.cpu}}
                   if self.cpu else {}),
                **({"samples": {str(n): [dict(zip(SAMPLE_FIELDS, r)) for r in rows]
                                for n, rows in self.samples}}
                   if self.samples else {}),
                **({"gemm_shapes": {f"{h}x{f}": list(v) for h, f, v in self.gemm_shapes}}
                   if self.gemm_shapes else {})}

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> "Calibration":
        data = read_json(path, "calibration")
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
            raise MoempiError(f"{path}: not a moempi calibration (format must be "
                              f"{CALIBRATION_FORMAT!r})")
        if data.get("version") != CALIBRATION_VERSION:
            raise MoempiError(f"{path}: unsupported calibration version {data.get('version')!r}")
        try:
            alltoall = {int(n): (float(v["latency_s"]), float(v["bandwidth_Bps"]))
                        for n, v in data["alltoall"].items()}
            # figures added later (first_touch_s, dense_*) are 0 in older files
            cpu = {int(n): (float(v["gemm_flops"]), float(v["weight_Bps"]),
                            float(v["token_elem_s"]), float(v["micro_batch_s"]),
                            *(float(v.get(k, 0.0)) for k in CPU_FIELDS[4:]))
                   for n, v in data.get("cpu", {}).items()}
            samples = {int(n): [tuple(float(r.get(k, 0.0)) for k in SAMPLE_FIELDS) for r in v]
                       for n, v in data.get("samples", {}).items()}
            shapes = {tuple(int(x) for x in k.split("x")): [float(f) for f in v]
                      for k, v in data.get("gemm_shapes", {}).items()}
            return cls.from_measurements(float(data["gemm_flops"]), alltoall,
                                         str(data.get("machine", "")),
                                         str(data.get("gemm_dtype", "float32")),
                                         cpu, samples, source=path, gemm_shapes=shapes)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise MoempiError(f"{path}: needs gemm_flops and alltoall "
                              "{ranks: {latency_s, bandwidth_Bps}}") from None


def _padded(row, width: int) -> tuple[float, ...]:
    """``row`` as ``width`` floats: cut, or padded with 0 (figures an older file lacks)."""
    return tuple(map(float, (tuple(row) + (0.0,) * width)[:width]))


def _interp_rows(rows, num_ranks: int) -> tuple[float, ...]:
    """Columns 1.. of ``(num_ranks, ...)`` ``rows`` at ``num_ranks``: linear in log2(ranks)
    between the neighbouring rows, clamped to the rows' range."""
    x = math.log2(max(num_ranks, 1))
    ranks = np.log2([r[0] for r in rows])
    return tuple(float(np.interp(x, ranks, [r[i] for r in rows])) for i in range(1, len(rows[0])))


# -- traffic ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Traffic:
    """One MoE layer's loads at the plan's batch, per GPU, in rows of ``H`` elements.

    Built from a GPU-to-GPU row matrix (:func:`traffic_from_rows`): what the exchange moves.
    With tensor parallelism (``tp`` GPUs per expert-parallel slot) the run sends each
    (token, expert) pair to every shard of its expert's slot and each shard returns a
    partial row, summed at the token's home in the combine
    (:func:`moempi.runtime.pipeline.tensor_parallel_pairs`): a pair is ``tp`` rows each
    way, and a shard's row costs ``1 / tp`` of the expert's FLOPs.
    """

    compute_pairs: float       # max over GPUs of rows computed / tp (full-expert equivalents)
    mean_compute_pairs: float  # the same, mean over GPUs (skew = max / mean)
    intra_pairs: float         # max over GPU ports: same-node rows to/from other GPUs, max(sent, recv)
    inter_pairs: float         # max over inter-node links (fat-tree: node uplink; direct: pair)
    offrank_pairs: float       # max over GPUs: rows sent to / received from other GPUs
    node_share: float = 0.0    # node dispatch: crossing rows / crossing pairs (one row per
                               # token and remote node); 0 = not known (uniform formula)
    copied_rows: float = 0.0   # max over GPUs of rows sent + rows received, its own included:
                               # the exchange's local copies (pack, decode, weighted sum)
    exchanged: bool = False    # rows as a run's exchange moved them (node dispatch's two
                               # stages included): forward_time applies no node formula

    @property
    def skew(self) -> float:
        return self.compute_pairs / self.mean_compute_pairs if self.mean_compute_pairs else 1.0


def traffic_from_rows(rows: np.ndarray, computed: np.ndarray | None, tp: int,
                      gpus_per_node: int, link: str, exchanged: bool = True) -> Traffic:
    """Loads of a GPU-to-GPU row matrix ``rows`` `[P, P]` (row: sender, column: receiver;
    a run's ``/stats/traffic`` layer) with ``computed`` `[P]` rows each GPU's experts
    computed (None: the column sums, as direct dispatch computes what it receives).

    Fat-tree: each node (``gpus_per_node`` consecutive GPUs) has one uplink to the switch,
    so a link carries the node's whole off-node traffic (out or in, whichever is larger).
    Direct: one link per node pair carries only that pair's traffic, both ways.
    """
    P = rows.shape[0]
    node = np.arange(P) // max(gpus_per_node, 1)
    same = node[:, None] == node[None, :]
    off = rows * ~np.eye(P, dtype=bool)
    intra = np.where(same, off, 0.0)
    done = rows.sum(axis=0) if computed is None else np.asarray(computed, float)
    n_nodes = int(node[-1]) + 1
    if n_nodes > 1:
        onehot = (node[:, None] == np.arange(n_nodes)[None, :]).astype(float)   # [P, nodes]
        by_node = onehot.T @ rows @ onehot                 # [nodes, nodes] rows node -> node
        np.fill_diagonal(by_node, 0.0)
        if link == "direct":
            inter = float(np.maximum(by_node, by_node.T).max())
        else:
            inter = float(max(by_node.sum(axis=1).max(), by_node.sum(axis=0).max()))
    else:
        inter = 0.0
    return Traffic(
        compute_pairs=float(done.max()) / tp, mean_compute_pairs=float(done.mean()) / tp,
        intra_pairs=float(max(intra.sum(axis=1).max(), intra.sum(axis=0).max())),
        inter_pairs=inter,
        offrank_pairs=float(max(off.sum(axis=1).max(), off.sum(axis=0).max())),
        copied_rows=float((rows.sum(axis=1) + rows.sum(axis=0)).max()),
        exchanged=exchanged)


def traffic_from_pairs(pairs: np.ndarray, tp: int, gpus_per_node: int, link: str) -> Traffic:
    """Loads of a slot-to-slot pair matrix ``pairs`` `[ep, ep]` float (row: sending slot, its
    ``tp`` GPUs' tokens; column: computing slot), slots node-major, ``gpus_per_node // tp``
    per node: as the run moves them, each of a slot GPU's pairs one row to every shard of
    the destination slot (:class:`Traffic`), the slot's tokens even over its GPUs."""
    rows = np.kron(pairs, np.ones((tp, tp))) / tp        # [(r, j), (s, i)] = pairs[r, s] / tp
    return traffic_from_rows(rows, None, tp, gpus_per_node, link, exchanged=False)


def uniform_node_share(nodes: int, top_k: int) -> float:
    """Rows crossing nodes under node dispatch per pair crossing under direct dispatch, for
    uniform routing: a token's ``K`` experts on independent uniform nodes need ``(M - 1) (1 -
    (1 - 1/M)^K)`` remote nodes against ``K (M - 1) / M`` remote pairs (M = 2, K = 2: 0.75;
    the measured skewed routing on 2 x 8 ranks gave 0.76)."""
    if nodes < 2:
        return 1.0
    return nodes * (1 - (1 - 1 / nodes) ** top_k) / top_k


def by_node(traffic: Traffic, share: float, slots_per_node: int) -> Traffic:
    """``traffic`` under node dispatch: ``share`` of the inter-node pairs cross (one row per
    token and node), and the node's relays forward what crossed, spread over their
    ``slots_per_node`` intra-node ports."""
    import dataclasses
    inter = traffic.inter_pairs * share
    per_gpu = traffic.inter_pairs / slots_per_node       # a GPU's crossing rows, direct
    # a GPU's off-rank rows: its crossing rows deduplicated, and as many forwarded inside
    # the node by the relays (stage 2); the extra stage adds as many local copies
    return dataclasses.replace(
        traffic, inter_pairs=inter, intra_pairs=traffic.intra_pairs + inter / slots_per_node,
        offrank_pairs=traffic.offrank_pairs + (2 * share - 1) * per_gpu,
        copied_rows=traffic.copied_rows + 2 * share * per_gpu)


def uniform_pairs(ep: int, tp: int, tokens_per_gpu: int, top_k: int) -> np.ndarray:
    """Uniform routing: each slot's ``tp * T * K`` pairs spread evenly over the ``ep`` slots."""
    return np.full((ep, ep), tp * tokens_per_gpu * top_k / ep)


def trace_pairs(home_slot: np.ndarray, dest_slot: np.ndarray, ep: int, scale: float) -> np.ndarray:
    """Pair matrix `[ep, ep]` of a routing trace: ``home_slot`` `[N]`, ``dest_slot`` `[N, K]`
    (-1 = dropped), counts multiplied by ``scale`` (plan tokens per trace token)."""
    src = np.broadcast_to(home_slot[:, None], dest_slot.shape)
    live = dest_slot >= 0
    flat = src[live].astype(np.int64) * ep + dest_slot[live]
    return np.bincount(flat, minlength=ep * ep).reshape(ep, ep) * scale


# -- time ---------------------------------------------------------------------------------
def pipeline_time(compute_s: float, exchange_s: float, latency_s: float, m: int,
                  phases: int = EXCHANGE_PHASES, overhead_s: float = 0.0,
                  shared_s: float = 0.0) -> float:
    """Time of one MoE layer cut into ``m`` micro-batches, s.

    Each micro-batch computes ``c = compute_s / m`` and moves ``x = phases * latency_s +
    exchange_s / m`` on the network (counts, dispatch and combine: ``exchange_s`` is the
    bandwidth time of dispatch + combine of the whole batch).  A two-resource pipeline
    (network, GPU) pays the first dispatch and the last compute and combine in full and then
    one bottleneck stage per further micro-batch (fill + steady state, the GPipe bubble
    argument, Huang et al. 2019): ``T(m) = c + x + (m - 1) * max(c, x)``.  ``m = 1`` is the
    blocking layer ``compute + exchange + phases * latency``; latency grows ``m``-fold, so
    with latency there is a best ``m``, without it more is never worse.  ``overhead_s``: a
    fixed cost each micro-batch pays per layer on the host that nothing hides (launching
    its steps; on a busy CPU, the exchange step's own code), ``+ m * overhead_s``.

    ``shared_s`` (included in ``compute_s``) is the shared expert's compute: it needs no
    exchange, so each micro-batch computes its share ``s = shared_s / m`` while its own
    dispatch is in flight.  The fill then pays ``max(x_d, s)`` instead of ``x_d + s``, where
    ``x_d`` is the dispatch part of ``x`` (all phases but the combine's, half the bandwidth
    time): ``T(m) = max(x_d, s) + (c - s) + x_c + (m - 1) * max(c, x)``, ``x_c = x - x_d``;
    ``shared_s = 0`` gives the formula above.
    """
    c = compute_s / m
    x = phases * latency_s + exchange_s / m
    s = shared_s / m
    x_d = (phases - COMBINE_PHASES.get(phases, 1)) * latency_s + exchange_s / (2 * m)
    fill = max(x_d, s) + (c - s) + (x - x_d)
    return fill + (m - 1) * max(c, x) + m * overhead_s


def best_micro_batches(compute_s: float, exchange_s: float, latency_s: float,
                       max_micro_batches: int = 16, overhead_s: float = 0.0,
                       shared_s: float = 0.0) -> int:
    """The ``m`` in 1..max minimising :func:`pipeline_time` (the smallest on ties)."""
    times = [pipeline_time(compute_s, exchange_s, latency_s, m, overhead_s=overhead_s,
                           shared_s=shared_s)
             for m in range(1, max(1, max_micro_batches) + 1)]
    return 1 + int(np.argmin(np.round(times, 15)))


def choose_micro_batches(tokens_per_rank: int, meta: ModelMeta, num_ranks: int, gemm_flops: float,
                         latency_s: float, bandwidth_Bps: float, wire_bytes: int,
                         max_micro_batches: int = 16, overhead_s: float = 0.0) -> int:
    """Micro-batch count for the runner's overlap pipeline, uniform routing assumed.

    ``tokens_per_rank`` tokens, ``gemm_flops`` achieved expert-GEMM FLOP/s of one rank,
    ``latency_s`` per exchange phase, ``bandwidth_Bps`` per rank each direction,
    ``wire_bytes`` per element (2 BF16, 4 fp32).  Compute ``T*K*2*Me*H*F / gemm_flops``
    (:func:`expert_flops_per_pair`) plus the shared expert's ``T * shared_flops_per_token``,
    which overlaps each micro-batch's dispatch; exchange ``2 * T*K*H*wire * (P-1)/P /
    bandwidth`` (dispatch + combine, the ``1/P`` kept locally); the count minimises
    :func:`pipeline_time` (with ``overhead_s`` per micro-batch and layer), capped by
    ``tokens_per_rank``.
    """
    if tokens_per_rank < 1 or num_ranks < 1 or not gemm_flops > 0 or not bandwidth_Bps > 0:
        raise MoempiError("choose_micro_batches: tokens, ranks, GEMM rate and bandwidth must be > 0")
    pairs = tokens_per_rank * meta.top_k
    shared = tokens_per_rank * shared_flops_per_token(meta) / gemm_flops
    compute = pairs * expert_flops_per_pair(meta) / gemm_flops + shared
    exchange = 2 * pairs * meta.hidden_size * wire_bytes * (num_ranks - 1) / num_ranks / bandwidth_Bps
    return best_micro_batches(compute, exchange, latency_s, min(max_micro_batches, tokens_per_rank),
                              overhead_s, shared)


@dataclass(frozen=True)
class LayerTimes:
    """Predicted times of one layer on the slowest GPU, s."""

    layer: int
    kind: str                  # "dense" | "moe"
    compute_s: float           # dense MLP, or expert GEMMs (skewed) + gate + shared expert
    dispatch_intra_s: float    # bandwidth time on the busiest intra-node port (incl. TP gather)
    dispatch_inter_s: float    # bandwidth time on the busiest inter-node link
    dispatch_s: float          # max of the two: the bottleneck link
    combine_s: float           # the same traffic back (docs/design.md §3)
    latency_s: float           # phases x m x latency
    micro_batches: int
    blocking_s: float          # compute + dispatch + combine + phases x latency (m = 1)
    overlapped_s: float        # pipeline_time with ``micro_batches``
    skew: float = 1.0          # max / mean expert pairs per GPU
    shared_s: float = 0.0      # of compute_s: the shared expert, overlapping its dispatch

    @property
    def latency_share(self) -> float:
        """Fraction of the exchange that is latency."""
        total = self.latency_s + self.dispatch_s + self.combine_s
        return self.latency_s / total if total else 0.0

    @property
    def exposed_s(self) -> float:
        """Layer time not covered by compute: the exchange left visible (fill, drain, excess)."""
        return self.overlapped_s - self.compute_s

    @property
    def hidden(self) -> bool:
        """True when the exchange can hide behind compute: with the least overlap (m = 2) each
        micro-batch's exchange, ``phases * latency + (dispatch + combine) / 2``, fits in its
        compute ``compute / 2``; i.e. ``dispatch + combine + 2 * phases * latency <= compute``."""
        per_phase = self.latency_s / self.micro_batches          # phases x one latency
        return (self.kind == "moe"
                and self.dispatch_s + self.combine_s + 2 * per_phase <= self.compute_s)

    def to_dict(self) -> dict:
        return {**asdict(self), "latency_share": self.latency_share, "exposed_s": self.exposed_s,
                "hidden": self.hidden}


def serial_time(lt: "LayerTimes") -> float:
    """A layer run without overlap in ``m`` micro-batches, one after the other: compute (at m)
    + exchange + ``phases * m`` latencies.  m = 1 is ``blocking_s``."""
    return lt.compute_s + lt.dispatch_s + lt.combine_s + lt.latency_s


def weight_stream_s(hw: Hardware, hidden: int, ffn: int, calls: int, matrices: int = 2) -> float:
    """Fixed cost of ``calls`` MLP calls: each streams its ``matrices * H * F`` weights (2
    plain, 3 gated; 0 if unmeasured)."""
    if not hw.weight_Bps:
        return 0.0
    return calls * matrices * hidden * ffn * COMPUTE_WEIGHT_BYTES / hw.weight_Bps


def dense_layer_time(meta: ModelMeta, hw: Hardware, tokens_per_gpu: int, layer: int,
                     micro_batches: int = 1) -> LayerTimes:
    """A dense layer: the MLP's ``2 * Md*H*Fd`` FLOPs per token (Md = 2 matrices plain, 3
    gated) at the GEMM rate, one weight stream per micro-batch (the runner runs the dense
    MLP per micro-batch); no exchange.

    With calibrated CPU terms (0 for datasheet hardware, where a GPU fuses these passes and
    they are noise next to the GEMMs) add the layer's elementwise work, memory-bound, so
    linear in the elements it streams: ``T * (H + Fd) * dense_elem_s`` (rmsnorm's square,
    scale and weight passes and the residual add over ``[T, H]``, the activation over
    ``[T, Fd]``; ``experts.rmsnorm``, ``experts.mlp``, one constant for both widths), and in
    the first layer of a fresh process's first pass (layer 0, before any heap reuse,
    :mod:`moempi.runtime.heap`) ``T * (H + Fd) * dense_touch_s`` for paging those temporaries in.
    Both are fitted on the calibration's dense layer (H 768, Fd 384).
    """
    elems = tokens_per_gpu * (meta.hidden_size + meta.dense_ffn_size)
    Md = meta.dense_matrices
    t = (tokens_per_gpu * 2 * Md * meta.hidden_size * meta.dense_ffn_size
         / hw.rate(meta.hidden_size, meta.dense_ffn_size)
         + weight_stream_s(hw, meta.hidden_size, meta.dense_ffn_size, micro_batches, Md)
         + elems * hw.dense_elem_s
         + (elems * hw.dense_touch_s if layer == 0 else 0.0))
    return LayerTimes(layer, "dense", t, 0.0, 0.0, 0.0, 0.0, 0.0, 1, t, t)


def moe_exchange(meta: ModelMeta, hw: Hardware, traffic: Traffic, wire_bytes: int) -> tuple:
    """(intra_s, inter_s) bandwidth time of one dispatch: pairs x H x wire bytes over the link.

    Measured hardware has one per-rank Alltoallv bandwidth: the busiest rank's off-rank rows
    over it, reported as intra, with no separate inter-node figure.
    """
    row = meta.hidden_size * wire_bytes                 # bytes of one token's hidden on the wire
    if hw.link == "measured":
        return traffic.offrank_pairs * row / hw.intra_Bps, 0.0
    return (traffic.intra_pairs * row / hw.intra_Bps,
            traffic.inter_pairs * row / hw.inter_Bps)


def copy_seconds(meta: ModelMeta, hw: Hardware, traffic: Traffic, wire_bytes: int) -> float:
    """The exchange's local copies on the busiest GPU: its rows sent plus received (its own
    included: they are packed and summed too) x H at the calibrated per-element cost of the
    wire format (0 for datasheet hardware)."""
    per = hw.copy_bf16_elem_s if wire_bytes == 2 else hw.copy_elem_s
    return traffic.copied_rows * meta.hidden_size * per


def moe_compute(meta: ModelMeta, hw: Hardware, traffic: Traffic, tokens_per_gpu: int,
                micro_batches: int = 1, experts_per_gpu: int = 1,
                touch_share: float = 0.0, wire_bytes: int = 4, tp: int = 1,
                phases: int = EXCHANGE_PHASES) -> float:
    """Expert GEMMs of the busiest GPU (:func:`expert_flops_per_pair` per pair, at the rate
    of its shard's shape ``(H, F / tp)``: :meth:`Hardware.rate`) plus its gate ``h @ gate``
    (2*H*E FLOPs per token), s; the shared expert is :func:`shared_compute`.

    With calibrated CPU terms (all 0 for datasheet hardware) add: one weight stream per
    (micro-batch, local expert) GEMM call, ``T * H * token_elem_s`` of per-token non-GEMM
    work, :func:`copy_seconds` (the exchange's local copies, by rows and wire format),
    ``m * micro_batch_s * phases / 3`` fixed work per micro-batch (calibrated on the direct
    dispatch's 3 exchange phases, mostly each phase's synchronisation of ranks sharing
    cores: node dispatch's 7 pay it 7/3 times) and ``touch_share`` of the run's
    first touch ``T * K * H * first_touch_s``: a fresh process faults its working set in
    during its first pass (measured: 4 700 to 9 000 faults of about 2 us each at the
    validation shapes); the faults follow the heap's growth over the first layers, so
    :func:`forward_time` gives each MoE layer its :func:`touch_shares` share.
    """
    shard = max(meta.moe_ffn_size // tp, 1)
    return (traffic.compute_pairs * expert_flops_per_pair(meta) / hw.rate(meta.hidden_size, shard)
            + tokens_per_gpu * 2 * meta.hidden_size * meta.num_experts / hw.gemm_flops
            + weight_stream_s(hw, meta.hidden_size, shard,
                              micro_batches * experts_per_gpu, meta.expert_matrices)
            + tokens_per_gpu * meta.hidden_size * hw.token_elem_s
            + copy_seconds(meta, hw, traffic, wire_bytes)
            + micro_batches * hw.micro_batch_s * phases / EXCHANGE_PHASES
            + touch_share * tokens_per_gpu * meta.top_k * meta.hidden_size * hw.first_touch_s)


def shared_compute(meta: ModelMeta, hw: Hardware, tokens_per_gpu: int,
                   micro_batches: int = 1) -> float:
    """The shared expert on one GPU, s: its own ``T`` tokens, no exchange
    (:func:`shared_flops_per_token` each), one weight stream per micro-batch; 0 without one."""
    if not meta.shared_ffn_size:
        return 0.0
    return (tokens_per_gpu * shared_flops_per_token(meta)
            / hw.rate(meta.hidden_size, meta.shared_ffn_size)
            + weight_stream_s(hw, meta.hidden_size, meta.shared_ffn_size, micro_batches,
                              meta.expert_matrices))


def touch_shares(moe_layers: int, head: float = 0.0) -> list[float]:
    """How a fresh process's first touch falls on its first pass's ``moe_layers`` MoE layers
    (they sum to 1): ``head`` in the first, ``(1 - head) / (L - 1)`` in each other; ``head``
    0 (not measured, or datasheet hardware) spreads it evenly.  The faults follow the heap's
    growth to its peak, which the first layers reach: the calibration's cold pass (4 MoE
    layers) put 44-82 % of its MoE excess in the first, most of the rest in the second
    (:func:`perf_validate.fit_runner` fits ``head``); beyond the calibration's depth the
    even rest is an approximation (it is really in the second layer)."""
    if moe_layers < 1:
        return []
    if head <= 0 or moe_layers == 1:
        return [1.0 / moe_layers] * moe_layers
    return [head] + [(1.0 - head) / (moe_layers - 1)] * (moe_layers - 1)


def layer_time(meta: ModelMeta, hw: Hardware, traffic: Traffic, tokens_per_gpu: int,
               micro_batches: int, wire_bytes: int, layer: int,
               experts_per_gpu: int = 1, touch_share: float = 0.0,
               phases: int = EXCHANGE_PHASES, tp: int = 1) -> LayerTimes:
    """Predicted times of MoE layer ``layer`` cut into ``micro_batches``.

    ``blocking_s`` is the m = 1 layer with nothing overlapped, the shared expert included
    (``compute + dispatch + combine + phases * latency``).  The CPU terms of
    :func:`moe_compute` depend on m, so ``compute_s`` is at ``micro_batches`` and
    ``blocking_s`` recomputes it at m = 1.  ``compute_s`` includes the shared expert
    (``shared_s``), which :func:`pipeline_time` overlaps with each micro-batch's dispatch.

    On calibrated host hardware (``link == "measured"``: ``moempi bench calibrate`` times
    CPU ranks, whose own cores copy the exchange's bytes through shared memory) the overlap
    cannot hide bandwidth time: ``overlapped_s`` is then compute + exchange + one fill's
    latencies + ``m * overlap_micro_s``, the overlapped machinery's measured cost."""
    m = micro_batches
    shared = shared_compute(meta, hw, tokens_per_gpu, m)
    compute = shared + moe_compute(meta, hw, traffic, tokens_per_gpu, m, experts_per_gpu,
                                   touch_share, wire_bytes, tp, phases)
    compute1 = (shared_compute(meta, hw, tokens_per_gpu, 1)
                + moe_compute(meta, hw, traffic, tokens_per_gpu, 1, experts_per_gpu, touch_share,
                              wire_bytes, tp, phases))
    intra, inter = moe_exchange(meta, hw, traffic, wire_bytes)
    dispatch = max(intra, inter)                        # links run concurrently: the slower one
    if hw.link == "measured" and m > 1:
        # a host: its cores do the MPI copies, so the bandwidth time adds to the compute
        # (only the waits hide), and the overlapped machinery costs overlap_micro_s each
        overlapped = (compute + 2 * dispatch + phases * hw.latency_s
                      + m * hw.overlap_micro_s)
    else:
        overlapped = pipeline_time(compute, 2 * dispatch, hw.latency_s, m, phases,
                                   shared_s=shared)
    return LayerTimes(layer, "moe", compute, intra, inter, dispatch, dispatch,
                      phases * m * hw.latency_s, m,
                      pipeline_time(compute1, 2 * dispatch, hw.latency_s, 1, phases),
                      overlapped, traffic.skew, shared)


@dataclass(frozen=True)
class Layout:
    """The parallel layout of a plan: ``ep * tp * dp`` GPUs."""

    ep: int = 256              # expert-parallel slots (one expert per slot at ep = E)
    tp: int = 1                # GPUs splitting one slot's experts (expert tensor parallelism)
    dp: int = 1                # replicas of the whole EP x TP group (no forward communication)
    tokens_per_gpu: int = 4096
    micro_batches: int = 0     # 0 = choose the best (auto)
    precision: str = "bf16"    # "bf16" production | "fp32" exact
    dispatch: str = "direct"   # "direct" | "node" (node-deduplicated, docs/design.md §3)

    @property
    def num_gpus(self) -> int:
        return self.ep * self.tp * self.dp

    @property
    def wire_bytes(self) -> int:
        return WIRE_BYTES[self.precision]

    def validate(self, gpus_per_node: int) -> "Layout":
        if self.dispatch not in ("direct", "node"):
            raise MoempiError(f"plan: dispatch must be direct or node, not {self.dispatch!r}")
        for name in ("ep", "tp", "dp", "tokens_per_gpu"):
            if getattr(self, name) < 1:
                raise MoempiError(f"plan: {name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batches < 0 or self.micro_batches > self.tokens_per_gpu:
            raise MoempiError(f"plan: micro-batches must be in 1..tokens per GPU "
                              f"({self.tokens_per_gpu}) or auto, got {self.micro_batches}")
        if self.precision not in WIRE_BYTES:
            raise MoempiError(f"plan: precision must be one of {', '.join(WIRE_BYTES)}")
        if self.tp > gpus_per_node or gpus_per_node % self.tp:
            raise MoempiError(f"plan: tp ({self.tp}) must divide the GPUs per node "
                              f"({gpus_per_node}): a TP group stays inside one node")
        return self


@dataclass(frozen=True)
class Forecast:
    """A whole forward pass: per-layer times, throughput, memory."""

    layout: Layout
    hardware: Hardware
    layers: tuple[LayerTimes, ...]
    memory: dict                 # bytes by component (memory.memory_per_gpu), "total" included
    fits: bool
    fitting_tp: int | None       # smallest TP that fits (None: none does)
    nodes: int                   # nodes of one EP x TP group
    max_micro_batches: int = 16
    tuning_s: float = 0.0        # what choosing the count costs the run (micro_batches = auto)
    tuning: dict | None = None   # the simulated choice: {"tried": {m: s}, "reason": ...}

    @property
    def forward_s(self) -> float:
        return sum(l.overlapped_s for l in self.layers)

    @property
    def blocking_forward_s(self) -> float:
        return sum(l.blocking_s for l in self.layers)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.layout.tokens_per_gpu / self.forward_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_s_per_gpu * self.layout.num_gpus

    @property
    def moe_layers(self) -> tuple[LayerTimes, ...]:
        return tuple(l for l in self.layers if l.kind == "moe")

    def to_dict(self) -> dict:
        return {"layout": asdict(self.layout), "hardware": asdict(self.hardware),
                "num_gpus": self.layout.num_gpus, "nodes_per_ep_group": self.nodes,
                "forward_s": self.forward_s, "blocking_forward_s": self.blocking_forward_s,
                "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
                "tokens_per_s": self.tokens_per_s,
                "micro_batches": self.moe_layers[0].micro_batches if self.moe_layers else 1,
                "memory_bytes": dict(self.memory), "memory_capacity_bytes": self.hardware.memory_bytes,
                "fits": self.fits, "smallest_fitting_tp": self.fitting_tp,
                "tuning_s": self.tuning_s, "tuning": self.tuning,
                "layers": [l.to_dict() for l in self.layers]}


def forward_time(meta: ModelMeta, hw: Hardware, layout: Layout,
                 traffic: dict[int, Traffic] | None = None,
                 max_micro_batches: int = 16, batches: int = 1) -> Forecast:
    """Predict the whole forward pass: ``num_dense_layers`` dense layers then the MoE layers.

    ``traffic`` maps a MoE layer to its :class:`Traffic` (from a routing trace); layers it
    lacks assume uniform routing.  ``layout.micro_batches == 0`` chooses the count as
    ``moempi run`` does, by its tuner's rules on the model's layer times
    (:func:`moempi.perf.tuning.simulate`: candidates timed on the first batch's MoE layers
    within 2 % of the job's ``batches`` x MoE work), and ``tuning_s`` is what the trials
    cost; ``tuning["best"]`` is the count that minimises the MoE layers' time (what to set
    ``pipeline.micro_batches`` to when the tuner's budget keeps it from trying).  Layers are timed one after another (a micro-batch's early start on the next
    layer is not credited: conservative).
    """
    layout.validate(hw.gpus_per_node)
    T = layout.tokens_per_gpu
    uniform = traffic_from_pairs(uniform_pairs(layout.ep, layout.tp, T, meta.top_k),
                                 layout.tp, hw.gpus_per_node, hw.link)
    per_layer = {l: (traffic or {}).get(l, uniform) for l in meta.moe_layers}
    phases = EXCHANGE_PHASES
    if layout.dispatch == "node":
        spn = max(hw.gpus_per_node // layout.tp, 1)
        share = uniform_node_share(math.ceil(layout.ep / spn), meta.top_k)
        per_layer = {l: t if t.exchanged else by_node(t, t.node_share or share, spn)
                     for l, t in per_layer.items()}
        phases = NODE_PHASES
    epg = experts_per_gpu(meta.num_experts, layout.ep)
    shares = touch_shares(len(per_layer), hw.first_touch_head)   # of the first touch
    m, tuning_s, tuning = layout.micro_batches, 0.0, None
    if m == 0:
        items = list(zip(per_layer.items(), shares))
        (l, t), s = items[min(1, len(items) - 1)]       # the tuner times the second MoE layer
        trial = lambda k: layer_time(meta, hw, t, T, k, layout.wire_bytes, l, epg, s,
                                     phases, layout.tp).overlapped_s
        m, tuning_s, tried, reason = simulate_tuning(
            trial, candidates(T, max_micro_batches), len(items) - 1, len(items) * batches)
        sums = {k: sum(layer_time(meta, hw, t, T, k, layout.wire_bytes, l, epg, s,
                                  phases, layout.tp).overlapped_s for (l, t), s in items)
                for k in range(1, min(max_micro_batches, T) + 1)}
        best = min(sums, key=lambda k: (round(sums[k], 15), k))
        tuning = {"tried": tried, "reason": reason, "best": best,
                  "best_moe_s": sums[best], "chosen_moe_s": sums[m]}
    layers = [dense_layer_time(meta, hw, T, l, m) for l in range(meta.num_dense_layers)]
    layers += [layer_time(meta, hw, t, T, m, layout.wire_bytes, l, epg, s, phases, layout.tp)
               for (l, t), s in zip(per_layer.items(), shares)]
    skew = max((t.skew for t in per_layer.values()), default=1.0)
    weight_bytes = 4 if layout.precision == "fp32" else meta.weight_bytes
    mem = memory_per_gpu(meta, layout.ep, layout.tp, T, m, layout.wire_bytes, weight_bytes, skew)
    fits = mem["total"] <= hw.memory_bytes
    fitting = layout.tp if fits else smallest_fitting_tp(
        meta, layout.ep, T, m, hw.memory_bytes, layout.wire_bytes, weight_bytes, skew,
        max_tp=hw.gpus_per_node)
    spn = max(hw.gpus_per_node // layout.tp, 1)
    return Forecast(layout, hw, tuple(layers), mem, fits, fitting, math.ceil(layout.ep / spn),
                    max_micro_batches, tuning_s, tuning)


__all__ = ["Calibration", "Forecast", "Hardware", "LayerTimes", "Layout", "Traffic",
           "best_micro_batches", "choose_micro_batches", "dense_layer_time",
           "expert_flops_per_pair", "shared_compute", "shared_flops_per_token",
           "forward_time", "layer_time", "memory_per_gpu", "pipeline_time", "smallest_fitting_tp",
           "touch_shares",
           "trace_pairs", "traffic_from_pairs", "uniform_pairs"]
