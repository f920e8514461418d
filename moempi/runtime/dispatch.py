"""Token exchange: a dispatch plan built once per layer and micro-batch, dispatch and combine over Alltoallv.

The only module that moves tokens between ranks.  Each micro-batch gets its own
:class:`Exchanger` on its own duplicate of the expert-parallel communicator: MPI matches
collectives per communicator in posting order, so micro-batches that reach a layer in a
different order on different ranks can never pair the wrong exchanges.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from moempi.errors import MoempiError
from moempi.model.arrays import BF16, array_module
from moempi.runtime.backend import HostBackend


@dataclass(frozen=True)
class DispatchPlan:
    """Where each (token, expert) pair of one micro-batch goes, and where its result returns.

    Pairs are numbered ``token * K + k``.  Sent rows are grouped by destination rank, then
    expert, so each source's block arrives at its destination already sorted by expert.
    """

    top_k: int
    pair_order: np.ndarray       # [S] int64, pairs in send order (dropped pairs absent)
    send_counts: np.ndarray      # [P] int32, rows this rank sends to each rank
    send_displs: np.ndarray      # [P] int32
    recv_counts: np.ndarray      # [P] int32, rows this rank receives from each rank
    recv_displs: np.ndarray      # [P] int32
    local_experts: tuple         # expert ids this rank computes for the layer, ascending
    expert_rows: np.ndarray      # [El] int64, received rows per local expert
    expert_order: np.ndarray | None  # [R] int64 received rows grouped by expert; None: already are

    @property
    def num_send(self) -> int:
        return int(self.pair_order.size)

    @property
    def num_recv(self) -> int:
        return int(self.recv_counts.sum())

    def expert_slices(self):
        """``(expert, rows)`` for each local expert: rows index the received buffer."""
        start = 0
        for e, n in zip(self.local_experts, self.expert_rows):
            idx = slice(start, start + n) if self.expert_order is None else \
                self.expert_order[start:start + n]
            start += n
            if n:
                yield e, idx

    def positions(self, num_tokens: int) -> np.ndarray:
        """`[N, K]` int64: each pair's row in the send order, -1 where dropped."""
        pos = np.full(num_tokens * self.top_k, -1, dtype=np.int64)
        pos[self.pair_order] = np.arange(self.num_send)
        return pos.reshape(num_tokens, self.top_k)

    def unpermute(self, back, num_tokens: int, order=None):
        """Combined rows `[S, H]` (send order) -> `[N, K, H]` per token and slot, 0 where dropped.

        ``order``: ``pair_order`` on the device of ``back`` (default: the host copy).
        """
        xp = array_module(back)
        shape = (num_tokens * self.top_k, back.shape[1])
        # every pair returns unless some were dropped: only then does the buffer need zeros
        out = xp.empty(shape, xp.float32) if len(back) == shape[0] else xp.zeros(shape, xp.float32)
        out[self.pair_order if order is None else order] = back
        return out.reshape(num_tokens, self.top_k, back.shape[1])


def drive(step):
    """Run an exchange step (``plan``/``dispatch``/``combine``) alone, waiting on what it yields."""
    try:
        waitable = next(step)
        while True:
            while not waitable.Test():
                pass
            waitable = step.send(None)
    except StopIteration as stop:
        return stop.value


def send_layout(topk_idx: np.ndarray, dest_rank: np.ndarray, num_ranks: int,
                num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Send order and counts of one micro-batch, before any communication.

    topk_idx, dest_rank `[N, K]` int32 (dest -1 = dropped).  Returns ``pair_order`` `[S]`
    int64 and ``pairs_per_rank_expert`` `[P, E]` int32 (rows to rank p for expert e).
    """
    dest = dest_rank.reshape(-1).astype(np.int64)
    pairs = np.flatnonzero(dest >= 0)
    key = dest[pairs] * num_experts + topk_idx.reshape(-1)[pairs]
    pair_order = pairs[np.argsort(key, kind="stable")]
    counts = np.bincount(key, minlength=num_ranks * num_experts)
    return pair_order, counts.reshape(num_ranks, num_experts).astype(np.int32)


def make_plan(top_k: int, pair_order: np.ndarray, sent: np.ndarray, received: np.ndarray,
              local_experts) -> DispatchPlan:
    """Finish a plan from the counts exchanged: ``sent``/``received`` `[P, E]` int32."""
    local_experts = tuple(int(e) for e in local_experts)
    stray = received.sum(axis=0)
    stray[list(local_experts)] = 0
    if stray.any():
        raise MoempiError(f"rank received tokens for expert {int(np.argmax(stray))} that it "
                          "does not host: ranks disagree on the placement")
    send_counts = sent.sum(axis=1).astype(np.int32)
    recv_counts = received.sum(axis=1).astype(np.int32)
    by_source = received[:, list(local_experts)]          # [P, El]
    expert_rows = by_source.sum(axis=0).astype(np.int64)
    expert_order = None
    if len(local_experts) > 1 and (expert_rows > 0).sum() > 1:
        labels = np.repeat(np.tile(np.arange(len(local_experts)), len(by_source)),
                           by_source.reshape(-1))
        expert_order = np.argsort(labels, kind="stable")
    return DispatchPlan(top_k, pair_order, send_counts, _displs(send_counts), recv_counts,
                        _displs(recv_counts), local_experts, expert_rows, expert_order)


def _displs(counts: np.ndarray) -> np.ndarray:
    displs = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=displs[1:])
    return displs


class Exchanger:
    """One micro-batch's exchange channel: a communicator, the wire format, reused buffers.

    ``plan``, ``dispatch`` and ``combine`` are generators: nonblocking, each yields what it
    waits for (an ``MPI.Request``; on a GPU also a :class:`moempi.runtime.backend.Ready` event for a
    staged buffer) and returns its result when resumed after completion; with
    ``blocking=True`` the collectives are blocking calls.  Buffers come from the backend:
    host memory, pinned host memory, or device memory under CUDA-aware MPI.
    """

    def __init__(self, comm: MPI.Comm, hidden: int, num_experts: int, precision: str,
                 blocking: bool = False, backend=None):
        self.backend = backend or HostBackend()
        self.comm = comm.Dup()
        self.hidden = hidden
        self.num_experts = num_experts
        self.blocking = blocking
        self.bf16 = precision == "bf16"
        base = MPI.UINT16_T if self.bf16 else MPI.FLOAT
        self.wire = np.uint16 if self.bf16 else np.float32
        self.rowtype = base.Create_contiguous(hidden).Commit()   # counts in rows, not elements
        self._buffers: dict[str, np.ndarray] = {}
        self._fences: dict = {}      # buffer name -> Ready of the last device copy from it
        self.mpi_seconds = 0.0       # time inside MPI calls (posting, or the blocking call)
        # MPICH sets up a new communicator's collective state on its first use: pay that
        # here, at start-up, rather than inside the first MoE layer's timings
        counts = np.zeros(self.comm.size, dtype=np.int32)
        self.comm.Alltoall(counts, np.empty_like(counts))
        self.comm.Ialltoallv([counts, (counts, counts), MPI.INT],
                             [np.empty_like(counts), (counts, counts), MPI.INT]).Wait()

    def close(self) -> None:
        """Release the communicator and datatype (explicitly, not in ``__del__``)."""
        self.rowtype.Free()
        self.comm.Free()

    # -- the three steps -----------------------------------------------------------------
    def plan(self, topk_idx, dest_rank, local_experts):
        """Exchange counts and build the :class:`DispatchPlan`; topk_idx/dest_rank `[N, K]`."""
        pair_order, sent = send_layout(topk_idx, dest_rank, self.comm.size, self.num_experts)
        received = np.empty_like(sent)
        yield from self._collective(self.comm.Alltoall, self.comm.Ialltoall, sent, received)
        return make_plan(topk_idx.shape[1], pair_order, sent, received, local_experts)

    def dispatch(self, plan: DispatchPlan, h):
        """Send each pair's token row ``h`` `[N, H]` to its expert's rank; returns the `[R, H]`
        rows received: float32, or on a device with a BF16 wire the BF16 rows as they came
        (the expert GEMMs take them as they are)."""
        self._order = self.backend.index(plan.pair_order)       # on h's device
        send = self._buffer("dispatch_send", plan.num_send)
        ready = self.backend.pack(h, self._order // plan.top_k, send, self.bf16,
                                  self._scratch("dispatch_bits", len(h), self.wire))
        yield from self._ready(ready)     # the GPU copy must land before MPI reads the buffer
        recv = self._buffer("dispatch_recv", plan.num_recv)
        yield from self._alltoallv(send, plan.send_counts, plan.send_displs,
                                   recv, plan.recv_counts, plan.recv_displs)
        rows = self.backend.unpack(recv, self.bf16,
                                   self._scratch("dispatch_f32", len(recv), np.float32),
                                   keep_bf16=True)
        self._fences["dispatch_recv"] = self.backend.fence()
        return rows

    def output_buffer(self, plan: DispatchPlan):
        """Where the experts may write their `[R, H]` float32 output so that combine sends it
        without a copy (fp32 on the wire, host memory), or None."""
        if self.bf16 or self.backend.gpu:
            return None
        return self._buffer("combine_send", plan.num_recv)

    def combine(self, plan: DispatchPlan, y):
        """Return expert outputs ``y`` `[R, H]` to the pairs' home ranks: `[S, H]` rows in
        send order (:meth:`add_weighted` sums them into the tokens): float32, or on the host
        with a BF16 wire the received bits.  Valid until this exchanger's next combine."""
        send = self._buffer("combine_send", plan.num_recv)
        yield from self._ready(self.backend.pack_all(y, send, self.bf16))
        recv = self._buffer("combine_recv", plan.num_send)
        yield from self._alltoallv(send, plan.recv_counts, plan.recv_displs,
                                   recv, plan.send_counts, plan.send_displs)
        if not self.backend.gpu:
            return recv                 # float32, or BF16 bits that add_weighted widens
        back = self.backend.unpack(recv, self.bf16)
        self._fences["combine_recv"] = self.backend.fence()
        return back

    def add_weighted(self, x, back, plan: DispatchPlan, weights) -> None:
        """``x += sum_k weights[:, k] * (token's k-th expert output)`` from :meth:`combine`'s
        rows: on the host gathered block by block (no `[N, K, H]` temporary), on a GPU
        un-permuted then one einsum on the stream."""
        if self.backend.gpu:
            x += self.backend.xp.einsum("nkh,nk->nh", self.per_token(back, plan, len(x)),
                                        weights)
        else:
            self.backend.weighted_sum(x, back, plan.positions(len(x)), weights)

    def per_token(self, back, plan: DispatchPlan, num_tokens: int):
        """:meth:`combine`'s rows as `[N, K, H]` float32 per token and slot, 0 where dropped."""
        if back.dtype == np.uint16:             # the host's BF16 wire: the received bits
            back = back.view(BF16).astype(np.float32)
        return plan.unpermute(back, num_tokens, self._order)

    # -- measurement -----------------------------------------------------------------------
    def replay(self, counts: list[tuple[np.ndarray, np.ndarray]]) -> float:
        """Time the same exchanges without compute: counts, dispatch and combine, blocking.

        ``counts``: ``(send_counts, recv_counts)`` `[P]` per exchange.  All ranks call it
        with their own counts of the same exchanges; returns seconds on this rank.
        """
        sent = np.zeros((self.comm.size, self.num_experts), dtype=np.int32)
        received = np.empty_like(sent)
        self.comm.Barrier()
        start = time.perf_counter()
        for send_counts, recv_counts in counts:
            self.comm.Alltoall(sent, received)
            send = self._buffer("dispatch_send", int(send_counts.sum()))
            recv = self._buffer("dispatch_recv", int(recv_counts.sum()))
            sd, rd = _displs(send_counts), _displs(recv_counts)
            self.comm.Alltoallv([send, (send_counts, sd), self.rowtype],
                                [recv, (recv_counts, rd), self.rowtype])
            self.comm.Alltoallv([recv, (recv_counts, rd), self.rowtype],
                                [send, (send_counts, sd), self.rowtype])
        return time.perf_counter() - start

    # -- machinery -------------------------------------------------------------------------
    def _ready(self, ready):
        """Wait for a staged buffer: yield it to the scheduler, or (blocking) wait here, so
        that blocking collectives are entered in micro-batch order on every rank."""
        if ready is None:
            return
        if self.blocking:
            ready.wait()
        else:
            yield ready

    def _alltoallv(self, send, send_counts, send_displs, recv, recv_counts, recv_displs):
        yield from self._collective(self.comm.Alltoallv, self.comm.Ialltoallv,
                                    [send, (send_counts, send_displs), self.rowtype],
                                    [recv, (recv_counts, recv_displs), self.rowtype])

    def _collective(self, blocking_call, nonblocking_call, *args):
        """The blocking call, or the nonblocking one whose request is yielded; the time spent
        inside MPI (not waiting) is added to ``mpi_seconds``."""
        t = time.perf_counter()
        if self.blocking:
            blocking_call(*args)
            self.mpi_seconds += time.perf_counter() - t
            return
        request = nonblocking_call(*args)
        self.mpi_seconds += time.perf_counter() - t
        yield request

    def _buffer(self, name: str, rows: int, dtype=None, host: bool = False):
        """A `[rows, H]` view of a grow-only exchange buffer, reused across layers and batches.

        A received buffer is copied to the device on the stream after the receive: it is
        reused (MPI writes it again) or regrown (its memory freed) only once that copy is
        done.  (By then it almost always is: the experts have long used the copy.)
        """
        fence = self._fences.pop(name, None)
        if fence is not None:
            fence.wait()
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows:
            shape = (max(rows, 1, int(1.25 * (0 if buf is None else buf.shape[0]))), self.hidden)
            dtype = dtype or self.wire
            buf = np.empty(shape, dtype) if host else self.backend.empty(shape, dtype)
            self._buffers[name] = buf
        return buf[:rows]

    def _scratch(self, name: str, rows: int, dtype):
        """Host rows for the host backend's BF16 rounding and widening; None otherwise."""
        return self._buffer(name, rows, dtype, host=True) if self.bf16 and \
            not self.backend.gpu else None


def probe_network(comm: MPI.Comm, hidden: int, wire_bytes: int, rows: int = 256,
                  repeats: int = 5) -> tuple[float, float]:
    """Measure Alltoallv per-message latency (s) and per-rank bandwidth (B/s) on ``comm``.

    Times an exchange of one row per peer and one of ``rows`` rows per peer (best of
    ``repeats``); latency is the small one, bandwidth the extra bytes over the extra time.
    The same figures on every rank (rank 0's, broadcast).
    """
    size = comm.size
    best = []
    for n in (1, rows):
        send = np.zeros(n * size * hidden * wire_bytes, dtype=np.uint8)
        recv = np.empty_like(send)
        counts = np.full(size, n * hidden * wire_bytes, dtype=np.int64)
        displs = np.arange(size, dtype=np.int64) * counts[0]
        times = []
        for _ in range(repeats):
            comm.Barrier()
            t = time.perf_counter()
            comm.Alltoallv([send, (counts, displs), MPI.BYTE], [recv, (counts, displs), MPI.BYTE])
            times.append(time.perf_counter() - t)
        best.append(min(times))
    latency = best[0]
    extra_bytes = (rows - 1) * hidden * wire_bytes * max(1, size - 1)
    # the extra bytes over the extra time, unless the large exchange took barely longer than
    # the small one (timer noise then gave figures like 783 TB/s): then the bytes over the
    # whole time (at least the small exchange's, which noise can make the slower), a lower bound
    spread = best[1] - best[0]
    bandwidth = extra_bytes / (spread if spread > best[1] / 2 else max(best))
    return comm.bcast((latency, bandwidth), root=0)
