"""The rank layout (data-parallel replicas x expert-parallel groups) and the job's control plane.

Control-plane traffic only: broadcasting what rank 0 read, agreeing on errors, gathering
results to rank 0.  Tokens move in :mod:`moempi.runtime.dispatch`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from moempi import errors
from moempi.errors import CollectiveError, MoempiError


@dataclass
class Layout:
    """Where this rank sits: ``world = dp x ep x tp``, tp innermost.

    World rank ``(d * ep + r) * tp + j`` is tensor-parallel shard ``j`` of expert-parallel
    slot ``r`` in replica ``d``.  The ``ep * tp`` ranks of a replica share one model copy
    and exchange tokens on ``ep_comm``; slot ``r``'s experts are split over its ``tp`` ranks.
    """

    world: MPI.Comm
    ep_comm: MPI.Comm        # this rank's replica: the ep * tp ranks sharing one model copy
    dp: int                  # data-parallel replicas
    ep: int                  # expert-parallel slots per replica
    dp_index: int            # which replica this rank belongs to
    tp: int = 1              # tensor-parallel ranks per slot

    @property
    def ep_rank(self) -> int:
        """This rank's expert-parallel slot (the placement's rank)."""
        return self.ep_comm.rank // self.tp

    @property
    def tp_rank(self) -> int:
        """This rank's shard of its slot's experts."""
        return self.ep_comm.rank % self.tp

    @property
    def rank_offset(self) -> int:
        """The world rank of this replica's first rank."""
        return self.dp_index * self.ep * self.tp

    def free(self) -> None:
        if self.ep_comm != self.world:
            self.ep_comm.Free()


def make_layout(world: MPI.Comm, ep: int, tp: int, dp: int) -> Layout:
    """Split ``world`` into ``dp`` replicas of ``ep * tp`` consecutive ranks."""
    size = world.size
    if ep == 0:
        if size % (tp * dp):
            raise MoempiError(f"parallel.tp = {tp} x parallel.dp = {dp} does not divide the "
                              f"world size {size}")
        ep = size // (tp * dp)
    if ep * tp * dp != size:
        raise MoempiError(f"parallel layout ep={ep} x tp={tp} x dp={dp} = {ep * tp * dp} "
                          f"ranks, but the job has {size} (mpiexec -n {ep * tp * dp})")
    group = ep * tp
    dp_index = world.rank // group
    ep_comm = world if dp == 1 else world.Split(dp_index, world.rank)
    return Layout(world, ep_comm, dp, ep, dp_index, tp)


def node_ranks(comm: MPI.Comm) -> int:
    """How many ranks of ``comm`` share this rank's node (its shared-memory group)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    size = node.size
    node.Free()
    return size


def root_call(comm: MPI.Comm, fn, *args):
    """Run ``fn`` on rank 0 and broadcast its result; its error is raised on every rank."""
    result, error = None, None
    if comm.rank == 0:
        try:
            result = fn(*args)
        except MoempiError as exc:
            error = str(exc)
    result, error = comm.bcast((result, error), root=0)
    if error is not None:
        raise CollectiveError(error)
    return result


def agree(comm: MPI.Comm, fn, *args):
    """Run ``fn`` on every rank; if any rank fails, every rank raises the first failure."""
    result, error = None, None
    try:
        result = fn(*args)
    except MoempiError as exc:
        error = str(exc)
    errors = comm.allgather(error)
    for rank, msg in enumerate(errors):
        if msg is not None:
            raise CollectiveError(msg if comm.size == 1 else f"rank {rank}: {msg}")
    return result


def sum_to_all(comm: MPI.Comm, x: np.ndarray) -> np.ndarray:
    """Elementwise sum over ranks, result on every rank (one small allreduce)."""
    out = np.empty_like(x)
    comm.Allreduce(np.ascontiguousarray(x), out, op=MPI.SUM)
    return out


def gather_stack(comm: MPI.Comm, x: np.ndarray) -> np.ndarray | None:
    """Stack each rank's equally shaped ``x`` on rank 0: `[P, *x.shape]`; None elsewhere."""
    x = np.ascontiguousarray(x)
    out = np.empty((comm.size, *x.shape), dtype=x.dtype) if comm.rank == 0 else None
    comm.Gather(x, out, root=0)
    return out


def stream_rows_to_root(comm: MPI.Comm, rows: np.ndarray, sink, chunk_bytes: int = 64 << 20):
    """Deliver every rank's `[n_r, ...]` rows to ``sink(rank, start_row, chunk)`` on rank 0.

    Ranks' rows arrive in rank order, in chunks of at most ``chunk_bytes``, so rank 0 never
    holds more than one chunk of another rank's data.
    """
    rows = np.ascontiguousarray(rows)
    counts = comm.gather(rows.shape[0], root=0)
    row_bytes = max(1, rows[:1].nbytes or rows.itemsize)
    step = max(1, chunk_bytes // row_bytes)
    if comm.rank == 0:
        sink(0, 0, rows)
        for src in range(1, comm.size):
            for start in range(0, counts[src], step):
                n = min(step, counts[src] - start)
                buf = np.empty((n, *rows.shape[1:]), dtype=rows.dtype)
                comm.Recv(buf, source=src, tag=7)
                sink(src, start, buf)
    else:
        for start in range(0, rows.shape[0], step):
            comm.Send(rows[start:start + step], dest=0, tag=7)


def stream_rows_to_dataset(comm: MPI.Comm, rows: np.ndarray, ds, starts) -> None:
    """:func:`stream_rows_to_root` into ``ds`` on rank 0, rank ``r``'s rows from row ``starts[r]``.

    ``ds`` (an HDF5 dataset or array, rows first) and ``starts`` are used on rank 0 only.
    """
    def sink(rank, start, chunk):
        first = starts[rank] + start
        ds[first:first + len(chunk)] = chunk

    stream_rows_to_root(comm, rows, sink)


def fail(comm: MPI.Comm, exc: BaseException) -> None:
    """A failure on this rank alone: say it in one line on stderr (and its traceback with
    ``--debug``) and abort the whole job now."""
    if errors.DEBUG and not isinstance(exc, MoempiError):
        sys.stderr.write(errors.traceback_text(exc) + "\n")
    sys.stderr.write(f"moempi: error: rank {comm.rank}: {errors.describe(exc)}\n")
    sys.stderr.flush()
    time.sleep(0.5)                # the launcher forwards the line before the abort's kill
    comm.Abort(1)
