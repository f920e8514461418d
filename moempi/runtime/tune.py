"""Start-up measurements that choose how the forward pass runs, not what it computes.

* The micro-batch count (``pipeline.micro_batches = 0``): chosen while the first batch runs
  (:func:`tuned_batch`), each candidate count on real MoE layers whose results are kept, so
  the choice costs only the trial layers' time over the best count's, within a budget of 2 %
  of the job's forecast MoE work (``pipeline.tuning_budget``).  The timings are the slowest
  rank's, so every rank keeps the same count.  Before, every candidate count ran 3 extra
  MoE layers 3 times at start-up: a 6-layer job at H 7168 on this project's 2-core machine
  spent 50 s on it for a 3.3 s forward.  A performance model chose before that
  (``perf.choose_micro_batches``, still what ``moempi plan`` uses); on the same machine it
  chose 8 micro-batches where 1 was 20-30 % faster.
* The exchange's local steps (CPU backend, ``pipeline.local_kernels``): numpy's steps, or
  the same steps compiled into one pass each (:mod:`moempi.model.fused`, same bits), which
  cost a fixed load at start-up; :func:`local_kernels` takes them only for a job whose
  exchanged rows repay that load.
* The expert GEMM chunk (CPU backend): while exchanges are in flight the expert compute is
  cut into chunks, with MPI progress between them; a chunk is the fewest rows whose GEMM
  keeps 95 % of the large-matrix rate, and a multiple of the BLAS's row quantum (below).

The micro-batch count changes a GEMM's row count, so the last bits: the first batch's
schedule (which layers ran with which count) and the choice are recorded, and a resumed run
reuses the choice.  The chunking never changes a bit.  A GEMM's row is computed alike in any piece
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
# the rules of the micro-batch choice, shared with the time model (``moempi plan``)
from moempi.perf.tuning import BUDGET_SHARE, Climb, candidates
from moempi.runtime.pipeline import Context, piece_rows, run_batch

QUANTA = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128)   # row quanta tried, fewest first
CHUNK_MIN, CHUNK_MAX = 32, 1024   # chunk sizes timed: quantum x 2^i in this range
CHUNK_SHARE = 0.95           # a chunk keeps this share of the largest size's GEMM rate


# What the compiled local steps save and cost, measured on this project's 2-core machine
# (numba 0.68, one core per rank): against numpy's steps they saved 0.19 ns per exchanged
# element at the least (fp32, H 7168: packing and the weighted sum of 1024 rows, 4.6 ->
# 3.2 ms; bf16 0.35 ns; H 1024 0.7-0.9 ns), and loading numba and the cached kernels took
# 0.3-0.6 s per process (compiling them the first time, once per installation, 2-3 s).
KERNEL_SAVING_S = 0.19e-9    # seconds saved per exchanged element (row x hidden), at least
KERNEL_LOAD_S = 0.6          # seconds to import numba and load the cached kernels, at most


def local_kernels(mode: str, gpu: bool, elements: int):
    """The exchange's local steps for a job: ``(kernels or None, record)``.

    ``mode`` is ``pipeline.local_kernels``; ``elements`` the elements (rows x hidden) one
    rank sends over the whole job, the same figure on every rank.  ``"auto"`` compiles when
    they save more than loading costs (:data:`KERNEL_SAVING_S`, :data:`KERNEL_LOAD_S`).
    ``record`` (for the output's ``tuning``): ``mode`` (``compiled``/``numpy``), ``reason``
    and ``load_seconds``.  A device backend has its own kernels: always ``numpy`` here.
    """
    saving = KERNEL_SAVING_S * elements
    if gpu:
        choice, reason = "numpy", "a GPU backend: its exchange runs on the device"
    elif mode != "auto":
        choice, reason = mode, "pipeline.local_kernels"
    elif saving > KERNEL_LOAD_S:
        choice, reason = "compiled", (f"forecast saving {saving:.1f} s over a load of at most "
                                      f"{KERNEL_LOAD_S} s")
    else:
        choice, reason = "numpy", (f"forecast saving {saving:.2f} s would not repay a load of "
                                   f"up to {KERNEL_LOAD_S} s")
    kernels = None
    if choice == "compiled":
        from moempi.model import fused
        kernels = fused.load()
    return kernels, {"mode": choice, "reason": reason,
                     "load_seconds": kernels.load_seconds if kernels else 0.0}


@dataclasses.dataclass
class Tuning:
    """What the micro-batch choice did in the job's first batch, recorded in the output."""

    chosen: int
    layer_seconds: dict           # count -> [seconds of each MoE layer it ran while tuning]
    schedule: list                # [(first layer, last layer + 1, count)] of the first batch
    budget_s: float               # what the tuning was allowed to cost
    cost_s: float                 # what it cost: the trial layers' time over the chosen
                                  # count's, plus the trials' synchronisations
    reason: str                   # why it stopped trying

    def to_dict(self) -> dict:
        return {"chosen": self.chosen, "cost_seconds": self.cost_s,
                "budget_seconds": self.budget_s, "reason": self.reason,
                "schedule": [list(s) for s in self.schedule],
                "layer_seconds": {str(m): ts for m, ts in self.layer_seconds.items()}}


def segment_seconds(count: int, measured: float) -> float:
    """The seconds the tuner judges a trial layer by (the slowest rank's wall time); tests
    replace this to plant a choice."""
    return measured


def tuned_batch(world: MPI.Comm, ctx: Context, exchangers: list, x: np.ndarray, batch: int,
                counts: list[int], moe_executions: int, share: float = BUDGET_SHARE,
                before_trials=None):
    """Run the job's first batch while choosing its micro-batch count; ``(rows, Tuning)``.

    No extra pass: every candidate count runs real MoE layers of this batch, whose results
    are kept.  The smallest count runs the dense layers and the first MoE layer (its first
    exchanges and GEMMs touch fresh memory: untimed), then the second, whose time ``t``
    forecasts the job's MoE work (``t * moe_executions``, all batches), and
    ``share`` of it is the budget.  Then each next count runs one MoE layer, while the
    layers tried so far plus a pessimistic prior for the next one (:data:`PRIOR` x ``t``)
    cost less than the budget; a count no faster than the best so far (by :data:`TIE`)
    ends the climb (the time falls, then rises, with the count).  The rest of the batch,
    and every later batch, runs with the best.  A trial layer's cost is its time over the
    best count's, so a job too short for the budget tries nothing and pays nothing.
    ``before_trials``: called once before the first trial (the GEMM chunk's measurement,
    which only more than one micro-batch needs); its time counts in the cost.
    Every rank calls this with the same arguments; the choice is the slowest rank's.
    """
    layers = list(ctx.weights.layers)
    moe = [i for i, layer in enumerate(layers) if layer.index in set(ctx.weights.meta.moe_layers)]
    counts = sorted(counts)
    seed, rest = counts[0], counts[1:]
    schedule = []
    sync = 0.0

    def run(a: int, b: int, m: int, timed: bool) -> float:
        """Layers ``a:b`` at ``m`` micro-batches; timed: the slowest rank's seconds."""
        nonlocal x, sync
        sub = dataclasses.replace(ctx, weights=Weights(ctx.weights.meta, layers[a:b], None))
        if ctx.on_segment is not None:
            ctx.on_segment(m, layers[a].index)
        t = time.perf_counter()
        x = run_batch(sub, exchangers[:m], x, 0, batch)
        seconds = time.perf_counter() - t
        schedule.append((layers[a].index, layers[b - 1].index + 1, m))
        if timed:
            t = time.perf_counter()
            seconds = world.allreduce(seconds, op=MPI.MAX)
            if m != seed:        # (the seed's wait for the slowest rank replaces the one the
                sync += time.perf_counter() - t     # next layer's first exchange would have)
            return segment_seconds(m, seconds)
        return 0.0

    if len(moe) < 2 or not rest:
        run(0, len(layers), seed, False)
        return x, Tuning(seed, {}, schedule, 0.0, 0.0,
                         "one candidate count" if not rest else "fewer than 2 MoE layers")
    run(0, moe[0] + 1, seed, False)      # the dense layers and a first MoE layer: warm-up
    first = moe[1]
    if first > moe[0] + 1:
        run(moe[0] + 1, first, seed, False)
    climb = Climb(counts, run(first, first + 1, seed, True), moe_executions, share)
    at = first + 1
    while (m := climb.next(at in moe)) is not None:
        if before_trials is not None:
            t = time.perf_counter()
            before_trials()
            sync += time.perf_counter() - t
            before_trials = None
        climb.record(m, run(at, at + 1, m, True))
        at += 1
    best = climb.best
    if at < len(layers):
        run(at, len(layers), best, False)
    times = {m: climb.times.get(m, []) for m in counts}
    return x, Tuning(best, times, schedule, climb.budget, climb.cost_s + sync, climb.reason)


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


def _expert_like(meta: ModelMeta, rows: int, seed: int = 0, ffn: int = 0):
    """Random rows (starting one row into their buffer, as received rows do) and weights of
    the job's expert shapes (of width ``ffn`` when given: the shared expert's)."""
    rng = np.random.default_rng(seed)
    H, F = meta.hidden_size, ffn or meta.moe_ffn_size
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
        # the routed experts' shapes, and the shared expert's (cut the same way) if it differs
        for ffn in {meta.moe_ffn_size, meta.shared_ffn_size or meta.moe_ffn_size}:
            h, w_in, w_out = _expert_like(meta, 2 * chosen + 5, seed=1, ffn=ffn)
            exact = exact and splits_exactly(h, w_in, w_out, meta.activation, chosen)
        exact = world.allreduce(exact, op=MPI.LAND)
    return (chosen if exact else 0), quantum, world.bcast(rates, root=0)
