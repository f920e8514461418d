"""Weight loading: each rank reads its own share of the model file, or rank 0 reads it all
and streams it (``run.weights``); a checksum of what each rank holds, compared across
data-parallel replicas.

``"each"``: every rank opens the model and reads the shared layers whole and its own
experts' slabs, one expert at a time, so it never touches the bytes of experts it does not
host.  The file must be visible on every node.

``"rank0"``: only rank 0 opens the file.  It reads the shared arrays and broadcasts them,
then reads each expert matrix once and sends it to every world rank that hosts it (the
expert's ranks in every replica), with at most ``window`` matrices in flight: reading the
next one overlaps sending the previous ones, and rank 0 never holds more than that many
beyond its own.  A read error on rank 0 stops every rank at the same point with its message.
"""

from __future__ import annotations

import time
import zlib
from collections import deque

import numpy as np
from mpi4py import MPI

from moempi.errors import MoempiError
from moempi.io.hdf5 import SCORE_BIAS, ModelReader
from moempi.model.shapes import MLP_MATRICES, ModelMeta
from moempi.model.stack import DenseLayer, MoeLayer, Weights
from moempi.place.placement import Placement

WINDOW = 4          # expert matrices rank 0 keeps in flight in "rank0" mode
_SLAB, _STOP = 11, 12


def checksum(a: np.ndarray) -> int:
    """CRC-32 of an array's bytes (float32, as read: before any device copy)."""
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8))


def _shared_names(meta: ModelMeta) -> list[tuple[str, tuple]]:
    """Every array all ranks need, in reading order, with its shape: norms, gates, dense
    MLPs, and each MoE layer's shared expert, its gate and the correction bias."""
    H, E, Fd, Fs = meta.hidden_size, meta.num_experts, meta.dense_ffn_size, meta.shared_ffn_size
    names = []
    for l in range(meta.num_layers):
        g = f"layers/{l:03d}"
        names.append((f"{g}/norm", (H,)))
        if meta.is_moe(l):
            names.append((f"{g}/gate", (H, E)))
            if Fs:
                names += [(f"{g}/shared/{n}", (Fs, H) if n == "w_out" else (H, Fs))
                          for n in MLP_MATRICES[meta.expert_kind]]
            if meta.shared_expert_gate:
                names.append((f"{g}/shared_gate", (H, 1)))
            if meta.has_score_bias:
                names.append((f"{g}/{SCORE_BIAS}", (E,)))
        else:
            names += [(f"{g}/mlp/w_in", (H, Fd)), (f"{g}/mlp/w_out", (Fd, H))]
            if meta.dense_kind == "gated":
                names.append((f"{g}/mlp/w_gate", (H, Fd)))
    if meta.has_final_norm:
        names.append(("final_norm", (H,)))
    return names


def _assemble(meta, shared: dict, experts: dict, to_device, expert_to_device) -> Weights:
    layers = []
    for l in range(meta.num_layers):
        g = f"layers/{l:03d}"
        norm = to_device(shared[f"{g}/norm"])
        if meta.is_moe(l):
            layer = MoeLayer(l, norm, to_device(shared[f"{g}/gate"]))
            for (ll, e), ws in sorted(experts.items()):
                if ll == l:
                    layer.experts[e] = tuple(expert_to_device(w) for w in ws)
            if meta.shared_ffn_size:     # computed like an expert, on every rank
                layer.shared = tuple(expert_to_device(shared[f"{g}/shared/{n}"])
                                     for n in MLP_MATRICES[meta.expert_kind])
            if meta.shared_expert_gate:
                layer.shared_gate = to_device(shared[f"{g}/shared_gate"])
            if meta.has_score_bias:
                layer.score_bias = shared[f"{g}/{SCORE_BIAS}"]
        else:
            w_gate = shared.get(f"{g}/mlp/w_gate")
            layer = DenseLayer(l, norm, to_device(shared[f"{g}/mlp/w_in"]),
                               to_device(shared[f"{g}/mlp/w_out"]),
                               None if w_gate is None else to_device(w_gate))
        layers.append(layer)
    final = to_device(shared["final_norm"]) if meta.has_final_norm else None
    return Weights(meta, layers, final)


def _sums(shared: dict, experts: dict, tp: int = 1, tp_rank: int = 0) -> dict:
    """``{"arrays": {name: CRC-32}, "seconds": time taken}`` of every array a rank holds (an
    expert's shard named as such: only the same shard of another replica must match)."""
    t = time.perf_counter()
    part = f" shard {tp_rank} of {tp}" if tp > 1 else ""
    sums = {name: checksum(a) for name, a in shared.items()}
    for (l, e), ws in experts.items():
        crc = 0
        for w in ws:
            crc = zlib.crc32(np.ascontiguousarray(w).view(np.uint8), crc)
        sums[f"layers/{l:03d}/experts[{e}]{part}"] = crc
    return {"arrays": sums, "seconds": time.perf_counter() - t}


def shard(meta: ModelMeta, tp: int, tp_rank: int) -> slice:
    """Shard ``tp_rank`` of an expert's hidden dimension F: columns of ``w_in``, rows of ``w_out``."""
    width = meta.moe_ffn_size // tp
    return slice(tp_rank * width, (tp_rank + 1) * width)


def load_weights(path: str, meta: ModelMeta, placement: Placement, ep_rank: int,
                 to_device=lambda a: a, expert_to_device=None, sums: bool = False,
                 tp: int = 1, tp_rank: int = 0) -> tuple[Weights, dict]:
    """``"each"``: read this rank's share of the model (with ``tp > 1`` only shard ``tp_rank``
    of each hosted expert).  Returns the weights and, with
    ``sums``, the checksum of every array read (``{"arrays": {name: CRC-32}, "seconds": t}``,
    an expert named ``layers/LLL/experts[e]``), else ``{}``."""
    expert_to_device = expert_to_device or to_device
    with ModelReader(path) as reader:
        shared = {name: reader.read(name) for name, _ in _shared_names(meta)}
        cols = shard(meta, tp, tp_rank) if tp > 1 else slice(None)
        names = MLP_MATRICES[meta.expert_kind]
        experts = {(l, e): reader.expert(l, e, cols, names) for l in meta.moe_layers
                   for e in placement.experts_on(l, ep_rank)}
    table = _sums(shared, experts, tp, tp_rank) if sums else {}
    return _assemble(meta, shared, experts, to_device, expert_to_device), table


def load_weights_from_root(world: MPI.Comm, path: str, meta: ModelMeta, placement: Placement,
                           ep: int, to_device=lambda a: a, expert_to_device=None,
                           sums: bool = False, tp: int = 1,
                           window: int = WINDOW) -> tuple[Weights, dict]:
    """``"rank0"``: rank 0 reads, every rank receives its share (call on every rank of
    ``world``, whose rank ``(d * ep + r) * tp + j`` is shard ``j`` of expert-parallel slot
    ``r`` in replica ``d``).  Returns what :func:`load_weights` does."""
    comm = world.Dup()
    expert_to_device = expert_to_device or to_device
    H, F = meta.hidden_size, meta.moe_ffn_size // tp
    matrices = MLP_MATRICES[meta.expert_kind]
    replicas = world.size // (ep * tp)
    try:
        reader, error = None, None
        if world.rank == 0:
            try:
                reader = ModelReader(path)
            except MoempiError as exc:
                error = str(exc)
        # the shared arrays: read by rank 0, broadcast, one at a time
        shared = {}
        for name, shape in _shared_names(meta):
            a = np.empty(shape, np.float32)
            if world.rank == 0 and error is None:
                try:
                    a = np.ascontiguousarray(reader.read(name), dtype=np.float32)
                except MoempiError as exc:
                    error = str(exc)
            error = comm.bcast(error, root=0)
            if error is not None:
                raise MoempiError(error)
            comm.Bcast(a, root=0)
            shared[name] = a
        # the expert matrices, in (layer, expert, w_in/w_out) order to every rank hosting them
        slot = (world.rank // tp) % ep
        wanted = [(l, e, which) for l in meta.moe_layers
                  for e in placement.experts_on(l, slot) for which in range(len(matrices))]
        experts: dict = {}
        if world.rank == 0:
            error = _send_experts(comm, reader, meta, placement, ep, tp, replicas, experts,
                                  window)
        else:
            status = MPI.Status()
            for l, e, which in wanted:
                a = np.empty((F, H) if matrices[which] == "w_out" else (H, F), np.float32)
                comm.Recv(a, source=0, tag=_SLAB, status=status)
                if status.Get_count(MPI.BYTE) != a.nbytes:        # rank 0 could not read
                    break
                experts.setdefault((l, e), [None] * len(matrices))[which] = a
        error = comm.bcast(error, root=0)
        if error is not None:
            raise MoempiError(error)
    finally:
        if world.rank == 0 and reader is not None:
            reader.close()
        comm.Free()
    experts = {key: tuple(pair) for key, pair in experts.items()}
    table = _sums(shared, experts, tp, world.rank % tp) if sums else {}
    return _assemble(meta, shared, experts, to_device, expert_to_device), table


def _send_experts(comm, reader, meta, placement, ep, tp, replicas, own: dict, window: int):
    """Rank 0's side: read each hosted expert matrix once, send each host its shard with at
    most ``window`` matrices in flight; returns the read error (the others are told to stop)."""
    in_flight: deque = deque()           # (requests, matrix) of the matrices being sent
    matrices = MLP_MATRICES[meta.expert_kind]
    pending = {r: sum(len(matrices) * len(placement.experts_on(l, (r // tp) % ep))
                      for l in meta.moe_layers) for r in range(1, comm.size)}
    try:
        for l in meta.moe_layers:
            hosts = {e: [(d * ep + r) * tp + j for d in range(replicas) for r in range(ep)
                         if e in placement.experts_on(l, r) for j in range(tp)]
                     for e in range(meta.num_experts)}
            for e, ranks in hosts.items():
                if not ranks:
                    continue
                for which, name in enumerate(matrices):
                    a = np.ascontiguousarray(
                        reader.read(f"layers/{l:03d}/experts/{name}", e), dtype=np.float32)
                    requests, kept = [], []      # the shards stay alive until sent
                    for r in ranks:
                        cols = shard(meta, tp, r % tp) if tp > 1 else slice(None)
                        part = np.ascontiguousarray(a[cols] if name == "w_out" else a[:, cols])
                        if r == 0:
                            own.setdefault((l, e), [None] * len(matrices))[which] = part
                        else:
                            requests.append(comm.Isend(part, dest=r, tag=_SLAB))
                            kept.append(part)
                            pending[r] -= 1
                    in_flight.append((requests, kept))
                    while len(in_flight) > window:
                        MPI.Request.Waitall(in_flight.popleft()[0])
                    for requests_, _ in in_flight:
                        MPI.Request.Testall(requests_)      # progress while reading the next
    except MoempiError as exc:
        stop = [comm.Isend(np.empty(0, np.float32), dest=r, tag=_SLAB)
                for r, n in pending.items() if n > 0]
        for requests_, _ in in_flight:
            MPI.Request.Waitall(requests_)
        MPI.Request.Waitall(stop)
        return str(exc)
    for requests_, _ in in_flight:
        MPI.Request.Waitall(requests_)
    return None


def compare_replicas(world: MPI.Comm, sums: dict) -> str | None:
    """Every rank's checksums (``sums`` of :func:`load_weights`) gathered to rank 0, which
    compares the copies of each array across ranks (the replicas of an expert, and the
    shared arrays everywhere); the first mismatch as a message on rank 0, else None."""
    gathered = world.gather(sums["arrays"], root=0)
    if world.rank != 0:
        return None
    seen: dict = {}                   # array -> (checksum, first world rank holding it)
    for rank, table in enumerate(gathered):
        for name, value in table.items():
            first = seen.setdefault(name, (value, rank))
            if first[0] != value:
                return (f"replicas differ: rank {rank} holds another {name} than rank "
                        f"{first[1]} (CRC-32 {value:08x} vs {first[0]:08x}); do the ranks read "
                        "the same model file? (run.model, run.weights)")
    return None
