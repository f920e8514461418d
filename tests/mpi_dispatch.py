"""Run under mpiexec: dispatch/combine invariants of moempi.dispatch at any world size.

Tokens are tagged with their source rank and pair id; after dispatch every row must sit
on the rank the placement says, for the expert it was sent to; after combine every pair
must get back exactly its own row.  Exits non-zero on the first violation.
"""

import sys

import numpy as np
from mpi4py import MPI

from moempi.dispatch import Exchanger, drive
from moempi.placement import Placement, assign_replicas


def check(comm, num_experts, precision, blocking, seed):
    rank, size = comm.rank, comm.size
    K, H, layer = 2, 8, 0
    placement = Placement.default(num_experts, size, [layer])
    rng = np.random.default_rng([seed, rank])
    n = int(rng.integers(0, 40))
    topk_idx = np.stack([rng.permutation(num_experts)[:K] for _ in range(n)]).astype(np.int32) \
        if n else np.zeros((0, K), np.int32)
    drop = rng.random(topk_idx.shape) < 0.1
    topk_idx[drop] = -1
    dest = assign_replicas(topk_idx, *placement.replica_table(layer, rank), rank)
    h = np.zeros((n, H), dtype=np.float32)
    h[:, 0] = rank                                   # source rank
    h[:, 1] = np.arange(n)                           # token id
    local = placement.experts_on(layer, rank)
    ex = Exchanger(comm, H, num_experts, precision, blocking)
    try:
        plan = drive(ex.plan(topk_idx, dest, local))
        recv = drive(ex.dispatch(plan, h))
        # every received row is a token of its source, for an expert hosted here
        sources = np.repeat(np.arange(size), plan.recv_counts)
        assert (recv[:, 0] == sources).all(), "row from the wrong source"
        y = np.empty_like(recv)
        for e, rows in plan.expert_slices():
            assert e in local
            y[rows] = recv[rows] * 0 + e             # tag with the expert that computed it
            y[rows, 0] = recv[rows, 0]
            y[rows, 1] = recv[rows, 1]
        out = drive(ex.combine(plan, y, n))          # [n, K, H]
        for k in range(K):
            live = topk_idx[:, k] >= 0
            assert (out[live, k, 0] == rank).all(), "combine returned another rank's row"
            assert (out[live, k, 1] == np.arange(n)[live]).all(), "combine lost token order"
            assert (out[live, k, 2] == topk_idx[live, k]).all(), "wrong expert computed"
            assert (out[~live, k] == 0).all(), "dropped pair got a value"
        sent = comm.allreduce(plan.num_send)
        assert sent == comm.allreduce(plan.num_recv) == comm.allreduce(int((dest >= 0).sum()))
    finally:
        ex.close()


def main():
    comm = MPI.COMM_WORLD
    cases = 0
    for num_experts in sorted({max(2, comm.size), comm.size + 1, 2 * comm.size}):
        for precision in ("fp32", "bf16"):
            for blocking in (False, True):
                check(comm, num_experts, precision, blocking, seed=num_experts)
                cases += 1
    if comm.rank == 0:
        print(f"dispatch invariants hold: {cases} cases on {comm.size} ranks")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as exc:
        sys.stderr.write(f"rank {MPI.COMM_WORLD.rank}: {exc}\n")
        MPI.COMM_WORLD.Abort(1)
