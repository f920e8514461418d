"""Dispatch and combine: pure plan building (serial) and the invariants under mpiexec."""

from pathlib import Path

import numpy as np
import pytest

from conftest import mpirun
from moempi.runtime.dispatch import make_plan, send_layout


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_invariants_under_mpi(n):
    proc = mpirun(n, Path(__file__).with_name("mpi_dispatch.py"), python=True, timeout=90)
    assert f"on {n} ranks" in proc.stdout


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_invariants_through_the_gpu_path(n):
    """The stand-in GPU backend (CuPy's stream, copy and pool rules): staged buffers,
    events, fp32 and bf16 wires, buffers growing per round."""
    proc = mpirun(n, Path(__file__).with_name("mpi_dispatch.py"), "standin", 16, 200,
                  python=True, timeout=90)
    assert f"on {n} ranks" in proc.stdout and "standin" in proc.stdout


def test_send_layout_groups_by_rank_then_expert():
    topk_idx = np.array([[3, 0], [1, 2], [0, 3]], dtype=np.int32)
    dest = np.array([[1, 0], [1, 0], [0, -1]], dtype=np.int32)   # expert e on rank e % 2
    order, counts = send_layout(topk_idx, dest, num_ranks=2, num_experts=4)
    # rank 0: expert 0 (pairs 1, 4), expert 2 (pair 3); rank 1: expert 1 (pair 2), expert 3 (pair 0)
    assert order.tolist() == [1, 4, 3, 2, 0]
    assert counts.tolist() == [[2, 0, 1, 0], [0, 1, 0, 1]]


def test_make_plan_groups_received_rows_by_expert():
    sent = np.array([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=np.int32)
    received = np.array([[2, 0, 1, 0], [1, 0, 3, 0]], dtype=np.int32)  # from ranks 0 and 1
    plan = make_plan(2, np.array([0, 1]), sent, received, local_experts=[0, 2])
    assert plan.recv_counts.tolist() == [3, 4] and plan.recv_displs.tolist() == [0, 3]
    slices = dict(plan.expert_slices())
    # received rows: [e0, e0, e2 | e0, e2, e2, e2]
    assert np.asarray(slices[0]).tolist() == [0, 1, 3]
    assert np.asarray(slices[2]).tolist() == [2, 4, 5, 6]


def test_make_plan_rejects_a_stray_expert():
    from moempi.errors import MoempiError
    received = np.array([[0, 1]], dtype=np.int32)
    with pytest.raises(MoempiError, match="does not host"):
        make_plan(2, np.array([], dtype=np.int64), np.zeros((1, 2), np.int32), received, [0])


def test_network_probe_gives_plausible_figures():
    """No timer-noise figures (a recorded 783 TB/s): the extra bytes of the large exchange
    cannot have moved in less than half the time of the small one.  With 2 rows of 1 float
    the two exchanges take the same time, and the old estimate (bytes over a difference of
    noise, floored at 1 ns) said 4 GB/s for 4 bytes."""
    from mpi4py import MPI
    from moempi.runtime.dispatch import probe_network
    for hidden, rows in ((1, 2), (1024, 256)):
        latency, bandwidth = probe_network(MPI.COMM_SELF, hidden, 4, rows=rows)
        extra_bytes = (rows - 1) * hidden * 4
        assert 0 < latency < 1.0
        assert 0 < bandwidth <= 2 * extra_bytes / latency
