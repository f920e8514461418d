"""Start-up measurements that choose how the forward pass runs, not what it computes.

* The micro-batch count (``pipeline.micro_batches = 0``): every candidate count is timed on
  the job's real weights and its first batch's tokens, through the first few MoE layers,
  and the fastest is kept (the fewest within 2 % of it).  The timings are the slowest rank's, so every rank keeps the
  same count.  A performance model chose before (``perf.choose_micro_batches``, still what
  ``moempi plan`` uses); on this project's 2-core machine it chose 8 micro-batches where 1
  was 20-30 % faster, and its choice varied from start to start.
* The expert GEMM chunk (CPU backend, ``pipeline.chunk_rows = 0``): while exchanges are in
  flight the expert compute is cut into chunks, with MPI progress between them; a chunk is
  the fewest rows whose GEMM keeps 95 % of the large-matrix rate (1024 rows).

Neither changes the numbers: the micro-batch count is recorded (and a resumed run reuses
it), and a chunk is never smaller than its size, at which OpenBLAS computes each row as in
the whole GEMM (``tests/test_run.py`` checks that chunked and unchunked runs are equal bit
for bit).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from mpi4py import MPI

from moempi.model.experts import mlp
from moempi.model.shapes import ModelMeta
from moempi.model.stack import Weights
from moempi.runtime.pipeline import Context, Scheduler, Telemetry, run_batch

CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16)
TRIAL_LAYERS = 3             # MoE layers each candidate is timed on
TIE = 0.02                   # counts this close to the fastest count as fast
CHUNK_SIZES = (64, 128, 256, 512, 1024)
CHUNK_SHARE = 0.95           # a chunk keeps this share of the large-matrix GEMM rate


def candidates(rows: int, most: int) -> list[int]:
    """The micro-batch counts worth timing for ``rows`` tokens per rank: at most ``most``,
    and none with micro-batches of fewer than 16 rows (their fixed costs dominate)."""
    keep = [m for m in CANDIDATES if m <= most and (m == 1 or rows // m >= 16)]
    return keep or [1]


def fastest(seconds: dict[int, float], tolerance: float = TIE) -> int:
    """The fewest micro-batches within ``tolerance`` of the fastest time: fewer micro-batches
    pay fewer fixed costs per layer, and timer noise does not pick a larger count."""
    best = min(seconds.values())
    return min(m for m, s in seconds.items() if s <= best * (1 + tolerance))


def time_micro_batches(world: MPI.Comm, ctx: Context, exchangers: list, x: np.ndarray,
                       counts: list[int], repeats: int = 3) -> dict[int, float]:
    """Seconds of the first :data:`TRIAL_LAYERS` MoE layers on rows ``x`` for each count in
    ``counts`` (best of ``repeats``, slowest rank), through the real ``run_batch``.

    ``ctx`` is the job's context; its telemetry, balancer state and routing are left as
    they were.  ``exchangers`` holds at least ``max(counts)``.  Called on every rank.
    """
    meta = ctx.weights.meta
    moe = [layer for layer in ctx.weights.layers if layer.index in set(meta.moe_layers)]
    trial_weights = Weights(meta, moe[:TRIAL_LAYERS], None)
    tel = Telemetry(meta.num_layers, len(meta.moe_layers), ctx.telemetry.num_ranks,
                    meta.num_experts)
    trial = dataclasses.replace(ctx, weights=trial_weights, telemetry=tel,
                                scheduler=Scheduler(tel), routing=None, on_layer_done=None,
                                bias=ctx.bias.copy())
    run_batch(trial, exchangers[:max(counts)], x, 0, -1)        # warm-up: buffers, caches
    best = {m: float("inf") for m in counts}
    for r in range(repeats):
        for m in counts if r % 2 == 0 else reversed(counts):     # drift hits all alike
            world.Barrier()
            t = time.perf_counter()
            run_batch(trial, exchangers[:m], x, 0, -1)
            best[m] = min(best[m], time.perf_counter() - t)
    return {m: world.allreduce(s, op=MPI.MAX) for m, s in best.items()}


def chunk_rows(meta: ModelMeta, world: MPI.Comm, repeats: int = 2) -> tuple[int, dict]:
    """The fewest rows (of :data:`CHUNK_SIZES`) whose expert MLP keeps :data:`CHUNK_SHARE`
    of the 1024-row rate on this rank's core; the largest such size over ranks, and the
    rates (FLOP/s, rank 0's) by size."""
    rng = np.random.default_rng(0)
    H, F = meta.hidden_size, meta.moe_ffn_size
    w_in = rng.standard_normal((H, F), dtype=np.float32) / np.float32(H ** 0.5)
    w_out = rng.standard_normal((F, H), dtype=np.float32) / np.float32(F ** 0.5)
    h = rng.standard_normal((max(CHUNK_SIZES), H), dtype=np.float32)
    rates = {}
    for rows in CHUNK_SIZES:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            mlp(h[:rows], w_in, w_out, meta.activation)
            best = min(best, time.perf_counter() - t)
        rates[rows] = 4.0 * rows * H * F / max(best, 1e-12)
    top = rates[max(CHUNK_SIZES)]
    chosen = next(r for r in CHUNK_SIZES if rates[r] >= CHUNK_SHARE * top)
    return world.allreduce(chosen, op=MPI.MAX), world.bcast(rates, root=0)
