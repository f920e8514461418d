"""Run under mpiexec: dispatch/combine invariants of moempi.runtime.dispatch at any world size.

Tokens are tagged with their source rank and token id; after dispatch every row must sit
on the rank the placement says, for the expert it was sent to; after combine every pair
must get back exactly its own row (tagged with the expert that computed it), and every
other element of the row must come back as it was sent (through BF16 on a BF16 wire).
Each case reuses one Exchanger for several rounds of different sizes, so its buffers grow
while earlier copies may still be in flight.  Exits non-zero on the first violation.

    mpiexec -n P python tests/mpi_dispatch.py [numpy|standin|cupy] [HIDDEN] [MAX_TOKENS]

On a device in bf16 the dispatch delivers the BF16 rows as they came off the wire.
"""

import sys

import ml_dtypes
import numpy as np
from mpi4py import MPI

from moempi.runtime.backend import make_backend
from moempi.runtime.dispatch import Exchanger, drive
from moempi.place.placement import Placement, assign_replicas


def check(comm, backend, num_experts, precision, blocking, seed, hidden, max_tokens):
    rank, size = comm.rank, comm.size
    K, layer = 2, 0
    placement = Placement.default(num_experts, size, [layer])
    local = placement.experts_on(layer, rank)
    ex = Exchanger(comm, hidden, num_experts, precision, blocking, backend=backend)
    try:
        for round_ in range(4):
            rng = np.random.default_rng([seed, rank, round_])
            n = int(rng.integers(0, max_tokens // (4 - round_) + 1))     # mostly growing
            one_round(comm, backend, ex, placement, local, rng, n, K, hidden, layer, precision)
    finally:
        ex.close()


def one_round(comm, backend, ex, placement, local, rng, n, K, hidden, layer, precision):
    rank, size, num_experts = comm.rank, comm.size, ex.num_experts
    topk_idx = np.stack([rng.permutation(num_experts)[:K] for _ in range(n)]).astype(np.int32) \
        if n else np.zeros((0, K), np.int32)
    topk_idx[rng.random(topk_idx.shape) < 0.1] = -1
    dest = assign_replicas(topk_idx, *placement.replica_table(layer, rank), rank)
    h = rng.standard_normal((n, hidden)).astype(np.float32)
    h[:, 0] = rank                                   # source rank
    h[:, 1] = np.arange(n) % 128                     # token id, exact in BF16
    h[:, 2] = np.arange(n) // 128
    if precision == "bf16":                          # what a BF16 wire delivers
        h = h.astype(ml_dtypes.bfloat16).astype(np.float32)
    plan = drive(ex.plan(topk_idx, dest, local))
    recv = backend.to_host(drive(ex.dispatch(plan, backend.to_device(h))))
    # every received row is a token of its source, for an expert hosted here
    sources = np.repeat(np.arange(size), plan.recv_counts)
    assert (recv[:, 0] == sources).all(), "row from the wrong source"
    y = recv.copy()
    for e, rows in plan.expert_slices():
        assert e in local
        y[rows, 3] = e                               # tag with the expert that computed it
    back = drive(ex.combine(plan, backend.to_device(y, y.dtype)))
    out = backend.to_host(ex.per_token(back, plan, n))                       # [n, K, H]
    for k in range(K):
        live = topk_idx[:, k] >= 0
        assert (out[live, k, 0] == rank).all(), "combine returned another rank's row"
        ids = out[live, k, 1] + 128 * out[live, k, 2]
        assert (ids == np.arange(n)[live]).all(), "combine lost token order"
        assert (out[live, k, 3] == topk_idx[live, k]).all(), "wrong expert computed"
        rest = np.delete(np.arange(hidden), 3)
        assert (out[live][:, k][:, rest] == h[live][:, rest]).all(), "row content changed"
        assert (out[~live, k] == 0).all(), "dropped pair got a value"
    sent = comm.allreduce(plan.num_send)
    assert sent == comm.allreduce(plan.num_recv) == comm.allreduce(int((dest >= 0).sum()))


def main():
    comm = MPI.COMM_WORLD
    name = sys.argv[1] if len(sys.argv) > 1 else "numpy"
    hidden = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    backend = make_backend(name, comm)
    cases = 0
    with backend.running():
        for num_experts in sorted({max(2, comm.size), comm.size + 1, 2 * comm.size}):
            for precision in ("fp32", "bf16"):
                for blocking in (False, True):
                    check(comm, backend, num_experts, precision, blocking, num_experts, hidden,
                          max_tokens)
                    cases += 1
    if comm.rank == 0:
        print(f"dispatch invariants hold: {cases} cases x 4 rounds on {comm.size} ranks, "
              f"{backend.describe()}, hidden {hidden}, up to {max_tokens} tokens")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as exc:
        sys.stderr.write(f"rank {MPI.COMM_WORLD.rank}: {exc}\n")
        MPI.COMM_WORLD.Abort(1)
