"""Start-up measurements that choose how the forward pass runs, not what it computes.

* The micro-batch count (``pipeline.micro_batches = 0``): every candidate count is timed on
  the job's real weights and its first batch's tokens, through the first few MoE layers,
  and the fastest is kept (the fewest within 2 % of it).  The timings are the slowest rank's, so every rank keeps the
  same count.  A performance model chose before (``perf.choose_micro_batches``, still what
  ``moempi plan`` uses); on this project's 2-core machine it chose 8 micro-batches where 1
  was 20-30 % faster, and its choice varied from start to start.
* The expert GEMM chunk (CPU backend): while exchanges are in flight the expert compute is
  cut into chunks, with MPI progress between them; a chunk is the fewest rows whose GEMM
  keeps 95 % of the large-matrix rate, and a multiple of the BLAS's row quantum (below).

Neither changes the numbers: the micro-batch count is recorded (and a resumed run reuses
it), and the chunking never changes a bit.  A GEMM's row is computed alike in any piece
only when the pieces keep the BLAS kernel's row blocking: OpenBLAS 0.3.31 (Haswell kernels,
this project's machine) gives each row the whole GEMM's bits when every piece but the last
is a multiple of 12 rows, and differs in the last bits with pieces of 4, 8, 16, 32, 64 or
128 rows (a 61-layer run with chunks of 8 rows once differed from the unchunked run).  So
the quantum is measured at start-up, on the job's shapes (:func:`row_quantum`), the chunk
is a multiple of it, and the chosen chunk is checked bit for bit before it is used
(``tests/test_run.py`` checks chunked and unchunked runs are equal bit for bit).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
from mpi4py import MPI

from moempi.model.experts import mlp
from moempi.model.shapes import ModelMeta
from moempi.model.stack import Weights
from moempi.runtime.pipeline import Context, Scheduler, Telemetry, piece_rows, run_batch

CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16)
TRIAL_LAYERS = 3             # MoE layers each candidate is timed on
TIE = 0.02                   # counts this close to the fastest count as fast
QUANTA = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128)   # row quanta tried, fewest first
CHUNK_MIN, CHUNK_MAX = 32, 1024   # chunk sizes timed: quantum x 2^i in this range
CHUNK_SHARE = 0.95           # a chunk keeps this share of the largest size's GEMM rate


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


def splits_exactly(h, w_in, w_out, activation: str, rows: int) -> bool:
    """Whether the expert MLP of ``h`` cut as :meth:`MicroBatch._experts` cuts it with
    exchanges always in flight (:func:`piece_rows`) gives the whole GEMM's bits."""
    whole = mlp(h, w_in, w_out, activation)
    done = 0
    while done < len(h):
        take = piece_rows(len(h) - done, rows, lambda: True)
        if not np.array_equal(mlp(h[done:done + take], w_in, w_out, activation),
                              whole[done:done + take]):
            return False
        done += take
    return True


def _expert_like(meta: ModelMeta, rows: int, seed: int = 0):
    """Random rows (starting one row into their buffer, as received rows do) and weights of
    the job's expert shapes."""
    rng = np.random.default_rng(seed)
    H, F = meta.hidden_size, meta.moe_ffn_size
    w_in = rng.standard_normal((H, F), dtype=np.float32) / np.float32(H ** 0.5)
    w_out = rng.standard_normal((F, H), dtype=np.float32) / np.float32(F ** 0.5)
    h = rng.standard_normal((rows + 1, H), dtype=np.float32)[1:]
    return h, w_in, w_out


def row_quantum(meta: ModelMeta, world: MPI.Comm) -> int:
    """The fewest rows (of :data:`QUANTA`) such that pieces of that many rows, and a longer
    last piece, reproduce the whole expert GEMM bit for bit on this rank (checked on
    ``3q + 5`` rows of the job's shapes); the least common multiple over ranks; 0 if none
    (then expert GEMMs are never cut)."""
    found = 0
    for q in QUANTA:
        h, w_in, w_out = _expert_like(meta, 3 * q + 5, seed=q)
        if splits_exactly(h, w_in, w_out, meta.activation, q):
            found = q
            break
    quanta = world.allgather(found)
    return 0 if 0 in quanta else math.lcm(*quanta)


def chunk_rows(meta: ModelMeta, world: MPI.Comm, given: int = 0,
               repeats: int = 2) -> tuple[int, int, dict]:
    """The expert GEMM chunk: ``(chunk, quantum, rates)``.

    ``chunk``: ``given`` rounded up to a multiple of the row quantum, else the fewest rows of
    the sizes ``quantum x 2^i`` in [:data:`CHUNK_MIN`, :data:`CHUNK_MAX`] whose expert MLP
    keeps :data:`CHUNK_SHARE` of the largest size's rate (the largest such over ranks);
    0 when there is no quantum or the chosen size does not split exactly (checked on every
    rank, up to :data:`CHUNK_MAX` rows).  ``rates``: FLOP/s by rows (rank 0's; empty when ``given``).
    """
    quantum = row_quantum(meta, world)
    if not quantum:
        return 0, 0, {}
    rates = {}
    if given:
        chosen = -(-given // quantum) * quantum
    else:
        sizes = [quantum << i for i in range(12) if CHUNK_MIN <= quantum << i <= CHUNK_MAX] \
            or [quantum]
        H, F = meta.hidden_size, meta.moe_ffn_size
        h, w_in, w_out = _expert_like(meta, max(sizes))
        for rows in sizes:
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                mlp(h[:rows], w_in, w_out, meta.activation)
                best = min(best, time.perf_counter() - t)
            rates[rows] = 4.0 * rows * H * F / max(best, 1e-12)
        top = rates[max(sizes)]
        chosen = world.allreduce(next(r for r in sizes if rates[r] >= CHUNK_SHARE * top),
                                 op=MPI.MAX)
    exact = True
    if chosen <= CHUNK_MAX:       # (a larger given chunk is a multiple of the quantum, unchecked)
        h, w_in, w_out = _expert_like(meta, 2 * chosen + 5, seed=1)
        exact = world.allreduce(splits_exactly(h, w_in, w_out, meta.activation, chosen),
                                op=MPI.LAND)
    return (chosen if exact else 0), quantum, world.bcast(rates, root=0)
