"""The micro-batch schedule: micro-batches flow through the layer stack, exchanges in flight under compute.

Each micro-batch is a generator that runs its layers and yields whenever it waits for
an exchange (an ``MPI.Request``; on a GPU also an event that marks a buffer ready).  The
:class:`Scheduler` resumes whichever micro-batch can go on, so while micro-batch i's
experts compute, micro-batch i+1's dispatch is in flight, and a micro-batch enters the
next layer as soon as its own combine is done: no barrier per layer.

Progress.  A nonblocking collective only advances inside MPI calls.  While exchanges are
in flight, expert compute on the CPU is cut into chunks of ``Context.chunk_rows`` rows (the
fewest that keep 95 % of the GEMM rate, :mod:`moempi.runtime.tune`) and
:meth:`Scheduler.poll` calls ``MPI_Testall`` on the requests in flight between chunks; with
nothing in flight an expert's rows are one GEMM.  The alternative, a progress thread, measured worse: with MPICH's
own (``MPIR_CVAR_ASYNC_PROGRESS=1``) the `moempi bench overlap` real shape (2 ranks on 2
cores, H 7168, F 2048, 512 tokens per rank) took 1709 ms per layer overlapped instead of
779 ms, because the thread spins on the core the GEMM needs (and a Python thread would add
the GIL).  On a GPU the same polling runs while the backend stream's kernels execute, which
is what the schedule is shaped for.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from moempi.model.balance import apply_capacity, capacity, topk_weights_for
from moempi.model.experts import rmsnorm
from moempi.model.gating import gate_probs, route, router
from moempi.model.stack import DenseLayer, Weights
from moempi.place.placement import Placement, assign_replicas
from moempi.runtime.nodes import NodeExchanger

# gate: norm + gating + routing; dispatch/combine: exchange time from posting to completion;
# expert: MLP compute (the dense MLP in dense layers); pack: gathering, BF16 rounding and
# widening exchange buffers; compute: all local work of the layer (gate + expert + pack
# + the weighted sum), i.e. everything but MPI calls and waiting; wait: time blocked for the
# layer's exchanges; busy: time running the layer's code (MPI calls included).
# A rank's wall time is the sum over layers of busy + wait.
TIMINGS = ("gate", "dispatch", "expert", "pack", "combine", "compute", "wait", "busy")


@dataclass
class Telemetry:
    """Per-layer counters of one rank, summed over micro-batches and batches."""

    num_layers: int
    num_moe: int
    num_ranks: int
    num_experts: int
    seconds: dict = field(default_factory=dict)        # name -> [L] float64
    traffic: np.ndarray = None          # [L_moe, P] int64, rows sent to each rank
    tokens_per_expert: np.ndarray = None  # [L_moe, E] int64, pairs routed from this rank
    rows_computed: np.ndarray = None    # [L_moe] int64, rows this rank's experts computed
    exchanges: list = None              # [L_moe] dicts (batch, micro-batch) -> (send_counts, recv_counts)
    rerouted: np.ndarray = None         # [L_moe] int64, pairs moved to another expert (capacity)
    dropped: np.ndarray = None          # [L_moe] int64, pairs dropped (capacity)

    def __post_init__(self):
        self.seconds = {name: np.zeros(self.num_layers) for name in TIMINGS}
        self.traffic = np.zeros((self.num_moe, self.num_ranks), dtype=np.int64)
        self.tokens_per_expert = np.zeros((self.num_moe, self.num_experts), dtype=np.int64)
        self.rows_computed = np.zeros(self.num_moe, dtype=np.int64)
        self.exchanges = [{} for _ in range(self.num_moe)]
        self.rerouted = np.zeros(self.num_moe, dtype=np.int64)
        self.dropped = np.zeros(self.num_moe, dtype=np.int64)

    def add(self, name: str, layer: int, seconds: float) -> None:
        self.seconds[name][layer] += seconds

    def exchanges_of(self, moe_index: int) -> list:
        """A MoE layer's exchanges in (batch, micro-batch) order: the same order on every rank."""
        return [counts for _, counts in sorted(self.exchanges[moe_index].items())]


class Scheduler:
    """Runs micro-batch generators to completion, blocking only when none can go on.

    A micro-batch yields what it waits for: an ``MPI.Request``, or on a GPU a
    :class:`moempi.runtime.backend.Ready` (an event marking a staged buffer).  Both answer ``Test()``.
    With only MPI requests pending the scheduler blocks in ``MPI_Waitany``; with GPU work
    pending it polls both, so MPI keeps progressing while kernels and copies run.
    """

    def __init__(self, telemetry: Telemetry):
        self.telemetry = telemetry
        self.pending: dict = {}      # micro-batch index -> what it waits for

    def poll(self) -> bool:
        """Let MPI progress the exchanges in flight (called between compute chunks); whether
        any is still in flight."""
        requests = [w for w in self.pending.values() if isinstance(w, MPI.Request)]
        return bool(requests) and not MPI.Request.Testall(requests)

    def run(self, tasks: list) -> None:
        """``tasks``: :class:`MicroBatch` objects; runs their ``steps`` until all are done."""
        ready = deque(range(len(tasks)))
        while ready or self.pending:
            while ready:
                i = ready.popleft()
                try:
                    waitable = next(tasks[i].steps)
                except StopIteration:
                    continue
                if waitable.Test():
                    ready.append(i)
                else:
                    self.pending[i] = waitable
            if self.pending:
                start = time.perf_counter()
                done = self._wait_any()
                self.telemetry.add("wait", tasks[done].layer, time.perf_counter() - start)
                ready.append(done)
                for i in list(self.pending):      # others completed meanwhile go on too
                    if self.pending[i].Test():
                        del self.pending[i]
                        ready.append(i)

    def _wait_any(self) -> int:
        """Block (MPI only) or poll (GPU work pending) until one pending item completes."""
        ids = list(self.pending)
        items = [self.pending[i] for i in ids]
        for i, w in zip(ids, items):
            # a poll() during compute may have completed (and freed) requests already:
            # Waitany would skip those and could wait forever for the others
            if w.Test():
                del self.pending[i]
                return i
        if all(isinstance(w, MPI.Request) for w in items):
            done = ids[MPI.Request.Waitany(items)]
            del self.pending[done]
            return done
        while True:
            for i, w in zip(ids, items):
                if w.Test():
                    del self.pending[i]
                    return i


@dataclass
class Context:
    """What every micro-batch of one rank shares."""

    weights: Weights
    placement: Placement
    ep_rank: int
    rank_offset: int                 # world rank of ep rank 0 (data-parallel replica offset)
    bias: np.ndarray                 # [L_moe, E] float32, load-balance bias (0 when off)
    telemetry: Telemetry
    scheduler: Scheduler
    backend: object                  # moempi.runtime.backend: HostBackend or DeviceBackend
    routing: dict | None = None      # layer -> (topk_idx [n, K], dest_rank [n, K]) to fill
    capacity_factor: float = 0.0     # per-replica capacity as a multiple of the mean; 0 = dropless
    reroute: bool = True             # overflow to the next-best expert with room (else drop)
    on_layer_done: object = None     # callable(micro_batch, layer) for progress reports, or None
    chunk_rows: int = 0              # expert GEMM rows between MPI polls while exchanges are in
                                     # flight (CPU); 0 = one GEMM per expert
    tp: int = 1                      # tensor-parallel ranks per expert-parallel slot
    on_segment: object = None        # callable(micro_batches, first layer) before a run_batch
                                     # of part of the stack (the tuner's segments), or None
    replica_tables: dict = field(default_factory=dict)

    def replicas(self, layer: int):
        if layer not in self.replica_tables:
            self.replica_tables[layer] = self.placement.replica_table(layer, self.ep_rank)
        return self.replica_tables[layer]


class MicroBatch:
    """One micro-batch's walk through the layers: ``steps`` yields the requests it waits on."""

    def __init__(self, ctx: Context, exchanger, x: np.ndarray, token_offset: int, key: tuple):
        self.ctx = ctx
        self.key = key               # (batch, micro-batch): identical on every rank
        self.exchanger = exchanger
        self.x = x                   # [n, H] float32, this micro-batch's residual stream
        self.offset = token_offset   # first row of x within the rank's shard
        self.layer = 0
        self.steps = self._forward()
        self._clock = 0.0
        self._shared_out = None      # [n, H] the current layer's shared-expert output

    def _forward(self):
        ctx, meta = self.ctx, self.ctx.weights.meta
        ex = self.exchanger
        x = self.x
        for layer in ctx.weights.layers:
            l = self.layer = layer.index
            start = self._clock = time.perf_counter()
            h = rmsnorm(x, layer.norm, meta.norm_eps)
            if isinstance(layer, DenseLayer):
                x += ctx.backend.mlp(h, layer.w_in, layer.w_out, meta.activation,
                                     w_gate=layer.w_gate)
                self._compute(l, start, "expert")
                self._done(l)
                continue
            # the MoE layer: route, dispatch, experts, combine
            topk_idx, topk_weights, dest_rank = self._route(layer, h)
            self._compute(l, start, "gate")
            if isinstance(ex, NodeExchanger):
                counts = yield from self._moe_by_node(layer, x, h, topk_idx, topk_weights,
                                                      dest_rank)
            else:
                counts = yield from self._moe_direct(layer, x, h, topk_idx, topk_weights,
                                                     dest_rank)
            self._record(l - meta.num_dense_layers, topk_idx, dest_rank, *counts)
            self._done(l)

    def _moe_direct(self, layer, x, h, topk_idx, topk_weights, dest_rank):
        """Dispatch, experts, combine straight between home and computing ranks; returns
        the counts :meth:`_record` keeps."""
        ex = self.exchanger
        pair_idx, pair_weights, pair_dest = tensor_parallel_pairs(
            topk_idx, topk_weights, dest_rank, self.ctx.tp, self.xp)
        plan = yield from self._exchange("dispatch", ex.plan(pair_idx, pair_dest,
                                                             sorted(layer.experts)))
        recv = yield from self._exchange("dispatch", ex.dispatch(plan, h),
                                         lambda: self._shared_expert(layer, h))
        y = self._experts(layer, plan, recv, ex)
        back = yield from self._exchange("combine", ex.combine(plan, y))
        t = time.perf_counter()
        ex.add_weighted(x, back, plan, pair_weights)
        self._add_shared(x)
        self._compute(layer.index, t)
        return plan.send_counts, plan.num_recv, (plan.send_counts, plan.recv_counts)

    def _moe_by_node(self, layer, x, h, topk_idx, topk_weights, dest_rank):
        """The two-stage exchange (:mod:`moempi.runtime.nodes`): each token once to a relay
        rank of each node it needs, forwarded there; its node's weighted outputs summed at
        the relay and one row sent back per node."""
        nx = self.exchanger
        nodes, relays = nx.to_nodes(dest_rank)
        plan1 = yield from self._exchange("dispatch", nx.inter.plan(nodes, relays, [nx.node]))
        rows = yield from self._exchange("dispatch", nx.inter.dispatch(plan1, h),
                                         lambda: self._shared_expert(layer, h))
        routing = nx.routing(topk_idx, self.ctx.backend.to_host(topk_weights), dest_rank)
        meta = yield from self._exchange("dispatch", nx.meta.dispatch(plan1, routing))
        idx2, dest2, w2 = nx.on_this_node(meta)
        plan2 = yield from self._exchange("dispatch", nx.intra.plan(idx2, dest2,
                                                                    sorted(layer.experts)))
        recv = yield from self._exchange("dispatch", nx.intra.dispatch(plan2, rows))
        y = self._experts(layer, plan2, recv, nx.intra)
        back = yield from self._exchange("combine", nx.intra.combine(plan2, y))
        t = time.perf_counter()
        summed = np.zeros((len(idx2), x.shape[1]), np.float32)      # a node's rows per token
        nx.intra.add_weighted(summed, back, plan2, w2)
        self._compute(layer.index, t)
        back = yield from self._exchange("combine", nx.inter.combine(plan1, summed))
        t = time.perf_counter()
        nx.inter.add_weighted(x, back, plan1, np.ones(nodes.shape, np.float32))
        self._add_shared(x)
        self._compute(layer.index, t)
        traffic = plan1.send_counts + nx.world_ranks(plan2.send_counts)
        return traffic, plan2.num_recv, (plan1.send_counts, plan1.recv_counts)

    @property
    def xp(self):
        return self.ctx.backend.xp

    def _route(self, layer, h):
        """Gate, top-k with the balance bias, capacity, replica choice for one MoE layer.

        Returns ``topk_idx`` `[n, K]` int32 (host, -1 = dropped), ``topk_weights`` `[n, K]`
        float32 (on h's device) and ``dest_rank`` `[n, K]` int32 (host).
        """
        ctx, meta, backend = self.ctx, self.ctx.weights.meta, self.ctx.backend
        m = layer.index - meta.num_dense_layers
        # the selection bias: the balancer's, which starts at the checkpoint's correction bias
        bias = backend.to_device(ctx.bias[m]) if ctx.bias[m].any() else None
        if ctx.capacity_factor > 0:      # (the unscaled softmax router only: runner.prepare)
            probs = gate_probs(h, layer.gate)
            topk_idx, topk_weights = route(probs, meta.top_k, bias, meta.norm_topk_prob)
        else:
            topk_idx, topk_weights = router(h, layer.gate, meta, bias)
        topk_idx = backend.to_host(topk_idx)            # the plan is built on the host
        if ctx.capacity_factor > 0:
            probs = backend.to_host(probs)
            replicas = np.array([len(r) for r in ctx.placement.hosts[layer.index]])
            room = capacity(topk_idx.size, meta.num_experts, replicas, ctx.capacity_factor)
            chosen = topk_idx
            topk_idx, moved, lost = apply_capacity(probs + ctx.bias[m], chosen, room,
                                                   ctx.reroute)
            topk_weights = backend.to_device(topk_weights_for(probs, topk_idx, chosen,
                                                              meta.norm_topk_prob))
            ctx.telemetry.rerouted[m] += moved
            ctx.telemetry.dropped[m] += lost
        dest_rank = assign_replicas(topk_idx, *ctx.replicas(layer.index), ctx.ep_rank)
        return topk_idx, topk_weights, dest_rank

    def _compute(self, layer: int, since: float, kind: str | None = None) -> None:
        """Count the time since ``since`` as compute (and as ``kind``) of ``layer``."""
        tel, now = self.ctx.telemetry, time.perf_counter()
        if kind:
            tel.add(kind, layer, now - since)
        tel.add("compute", layer, now - since)
        tel.add("busy", layer, now - self._clock)
        self._clock = now

    def _done(self, layer: int) -> None:
        if self.ctx.on_layer_done is not None:
            self.ctx.on_layer_done(self.key[1], layer)

    def _exchange(self, name: str, step, while_in_flight=None):
        """Run an exchange step; the time from posting to completion counts as ``name``.

        ``while_in_flight``: local work (the shared expert) run once the step has posted its
        first request, before waiting on it; after the step when it never waits (blocking)."""
        tel, l = self.ctx.telemetry, self.layer
        posted = time.perf_counter()
        result = None
        try:
            while True:
                request = self._local_step(step, result)
                if while_in_flight is not None:
                    while_in_flight()            # (counted as compute by itself)
                    while_in_flight = None
                tel.add("busy", l, time.perf_counter() - self._clock)   # busy until the yield
                yield request
                self._clock = time.perf_counter()
        except StopIteration as stop:
            result = stop.value
        tel.add(name, l, time.perf_counter() - posted)
        if while_in_flight is not None:
            while_in_flight()
        return result

    def _shared_expert(self, layer, h) -> None:
        """The shared expert on this micro-batch's own tokens ``h`` `[n, H]` (no exchange),
        times ``sigmoid(h @ shared_gate)`` where the model has that gate, kept for
        :meth:`_add_shared`; None without one.

        Run while the dispatch is in flight: on the CPU in pieces of ``chunk_rows`` rows
        with MPI progress between them, as the experts (so the same bits whatever the
        timing); on a GPU enqueued on the stream while MPI moves the rows.
        """
        self._shared_out = None
        if layer.shared is None:
            return
        xp = self.xp
        start = time.perf_counter()
        y = xp.empty(h.shape, dtype=xp.float32)
        self._mlp_in_pieces(layer.shared, h, y, slice(0, len(h)))
        if layer.shared_gate is not None:
            y *= 1.0 / (1.0 + xp.exp(-(h @ layer.shared_gate)))        # [n, 1]
        self._compute(layer.index, start, "expert")
        self._shared_out = y

    def _add_shared(self, x) -> None:
        """Add the layer's shared-expert output (if any) to the tokens ``x``, after the
        routed experts' weighted sum."""
        if self._shared_out is not None:
            x += self._shared_out
            self._shared_out = None

    def _local_step(self, step, value):
        """Advance an exchange step; its local work (packing, not MPI calls) counts as compute."""
        tel, ex = self.ctx.telemetry, self.exchanger
        t, mpi = time.perf_counter(), ex.mpi_seconds
        try:
            return step.send(value)
        finally:
            local = time.perf_counter() - t - (ex.mpi_seconds - mpi)
            tel.add("pack", self.layer, local)
            tel.add("compute", self.layer, local)

    def _experts(self, layer, plan, recv, exchanger):
        """The local experts on the received rows `[R, H]`.

        On the CPU, while exchanges are in flight, an expert's rows are cut into chunks of
        ``chunk_rows`` with MPI progress between them; once nothing is in flight the rest
        is one GEMM.  Every piece but the last has exactly ``chunk_rows`` rows, a multiple of
        the BLAS's row quantum (:func:`moempi.runtime.tune.row_quantum`), so each row comes
        out as in one GEMM.  On a GPU an expert is
        one GEMM enqueued on the backend's stream, and the polls run while the GPU works.
        """
        backend = self.ctx.backend
        start = time.perf_counter()
        y = exchanger.output_buffer(plan)
        if y is None:                   # float32, or BF16 rows for the wire (GPU, bf16)
            y = self.xp.empty(recv.shape, dtype=recv.dtype)
        for e, rows in plan.expert_slices():
            if not isinstance(rows, slice):
                rows = backend.index(rows)      # one host->device copy per expert, not per chunk
            self._mlp_in_pieces(layer.experts[e], recv, y, rows)
            self.ctx.scheduler.poll()
        self._compute(layer.index, start, "expert")
        return y

    def _mlp_in_pieces(self, weights: tuple, src, y, rows) -> None:
        """``y[rows]`` = the MLP ``weights`` (an expert's tuple) of ``src[rows]``: ``rows`` a
        slice (a block of ``y``, which the GEMM writes in place on the host) or an index
        array; in pieces of ``chunk_rows`` while exchanges are in flight, with MPI progress
        between them (:func:`piece_rows`: no piece but the last differs from the chunk)."""
        meta, backend, scheduler = self.ctx.weights.meta, self.ctx.backend, self.ctx.scheduler
        w_gate = weights[2] if len(weights) == 3 else None
        first, n = (rows.start, rows.stop - rows.start) if isinstance(rows, slice) \
            else (0, len(rows))
        done = 0
        while done < n:
            take = piece_rows(n - done, self.ctx.chunk_rows, scheduler.poll)
            if isinstance(rows, slice):
                part = slice(first + done, first + done + take)
                out = y[part] if not backend.gpu else None
            else:
                part, out = rows[done:done + take], None
            result = backend.mlp(src[part], weights[0], weights[1], meta.activation, out,
                                 w_gate=w_gate)
            if result is not out:
                y[part] = result
            done += take

    def _record(self, m: int, topk_idx, dest_rank, traffic, rows_computed, exchange) -> None:
        """``traffic``: rows this rank sent to each rank of its replica; ``rows_computed`` by
        its experts; ``exchange``: (send, recv) counts of the exchange to replay alone."""
        ctx, tel = self.ctx, self.ctx.telemetry
        tel.traffic[m] += traffic
        tel.rows_computed[m] += rows_computed
        live = topk_idx[dest_rank >= 0]
        tel.tokens_per_expert[m] += np.bincount(live, minlength=tel.num_experts)
        tel.exchanges[m][self.key] = exchange
        if ctx.routing is not None:
            idx, dest = ctx.routing[m]
            rows = slice(self.offset, self.offset + len(topk_idx))
            idx[rows] = topk_idx
            dest[rows] = np.where(dest_rank >= 0, dest_rank * ctx.tp + ctx.rank_offset, -1)


def tensor_parallel_pairs(topk_idx, topk_weights, dest_rank, tp: int, xp=np):
    """The pairs a micro-batch sends: with ``tp > 1`` each (token, expert) pair goes to every
    tensor-parallel shard of its expert's slot, as ``K * tp`` pairs per token (column
    ``k * tp + j``: shard ``j``, destination ``slot * tp + j`` on the replica's communicator)
    with the pair's weight on each; the partial rows the shards return then sum into the
    token in the combine's weighted sum.  ``tp = 1``: the pairs as routed.

    Why the sum happens in the combine and not in the tensor-parallel group: the tokens are
    not replicated across a group's ranks (each rank owns its own tokens, as without TP), so
    the only extra traffic is the partial rows coming back, ``tp`` times the combine.  Summing
    in the group instead needs the group's ranks to share their tokens (a layer's input
    replicated ``tp`` times, its gate and dense layers computed ``tp`` times) and an
    all-reduce of every token's row per MoE layer on top of the same dispatch.  Measured by
    ``moempi bench tp`` (4 ranks, tp 2, H 7168, 256 tokens per rank, top-2, the 2-core
    development VM): the extra partial rows took 7.7 ms per layer, the group all-reduce 10.7
    ms, before counting the replicated gate and dense work it would also need.
    """
    if tp == 1:
        return topk_idx, topk_weights, dest_rank
    K = topk_idx.shape[1]
    idx = np.repeat(topk_idx, tp, axis=1)
    shard = np.tile(np.arange(tp, dtype=np.int32), K)
    dest = np.repeat(dest_rank, tp, axis=1)
    dest = np.where(dest >= 0, dest * tp + shard, -1).astype(np.int32)
    return idx, xp.repeat(topk_weights, tp, axis=1), dest


def piece_rows(left: int, chunk: int, in_flight) -> int:
    """Rows of an expert's next GEMM piece with ``left`` rows to go: ``chunk`` while at least
    twice that is left and ``in_flight()`` (asked only then) says exchanges are pending,
    else all that is left, so no piece but the last differs from ``chunk``."""
    return chunk if chunk and left >= 2 * chunk and in_flight() else left


def split_rows(num_rows: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(start, stop)`` ranges covering ``num_rows`` (some may be empty)."""
    bounds = [num_rows * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def run_batch(ctx: Context, exchangers: list, x: np.ndarray, token_offset: int,
              batch: int) -> np.ndarray:
    """Forward one batch `[n, H]` float32 through the stack in ``len(exchangers)`` micro-batches.

    Every rank calls this with the same number of micro-batches (some may be empty).
    ``x`` is on the host; returns the residual stream after the last layer (before the
    final norm), on the host.
    """
    backend = ctx.backend
    with backend.running():          # on a GPU: every kernel on the backend's one stream
        tasks = [MicroBatch(ctx, ex, backend.to_device(x[a:b]), token_offset + a, (batch, i))
                 for i, (ex, (a, b)) in enumerate(zip(exchangers,
                                                      split_rows(len(x), len(exchangers))))]
        ctx.scheduler.run(tasks)
        return np.concatenate([backend.to_host(t.x) for t in tasks])
