"""The CuPy stand-in reproduces the ordering rules the GPU path must keep, and the backend keeps them.

Each hazard test does what a broken GPU path would do and expects the stand-in to show it
(wrong numbers or a :class:`StreamOrderError`), as the H100 did; the undo-the-fix tests
run the real exchange and forward with one part of the fix taken back out.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from mpi4py import MPI

from moempi.runtime import cupy_standin as cp
from moempi.runtime.backend import DeviceBackend
from moempi.runtime.dispatch import Exchanger, drive
from moempi.place.placement import Placement, assign_replicas


def test_a_with_block_forgets_the_stream_set_by_use():
    """CuPy's stream stack: leaving ``with`` makes the previous *stack* entry current."""
    s1, s2 = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    s1.use()
    assert cp.cuda.get_current_stream() is s1
    with s2:
        assert cp.cuda.get_current_stream() is s2
    assert cp.cuda.get_current_stream() is cp.cuda.Stream.null      # not s1
    with s1:
        with s2:
            pass
        assert cp.cuda.get_current_stream() is s1
    assert cp.cuda.get_current_stream() is cp.cuda.Stream.null


def test_a_kernel_on_the_null_stream_races_a_non_blocking_stream():
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        x = cp.asarray(np.arange(4, dtype=np.float32))
    with pytest.raises(cp.StreamOrderError):
        x * 2                                             # on the null stream: unordered
    cp.cuda.Stream.null.wait_event(s.record())
    assert (x * 2).get(stream=cp.cuda.Stream.null).tolist() == [0, 2, 4, 6]
    blocking = cp.cuda.Stream()                           # legacy-synchronising
    with blocking:
        y = cp.asarray(np.ones(3, np.float32))
    assert (y + 1).get(stream=cp.cuda.Stream.null).tolist() == [2, 2, 2]


def test_a_kernel_refuses_host_arrays():
    with cp.cuda.Stream(non_blocking=True):
        x = cp.zeros(3, dtype=np.float32)
        with pytest.raises(TypeError, match="host numpy array"):
            x + np.ones(3, np.float32)


def test_a_staged_copy_lands_only_when_the_host_learns_it_is_done():
    """Device -> pinned host: poisoned until an event says done; MPI reading earlier gets NaN."""
    s = cp.cuda.Stream(non_blocking=True)
    pinned = np.frombuffer(cp.cuda.alloc_pinned_memory(16), np.float32, 4)
    with s:
        d = cp.asarray(np.arange(4, dtype=np.float32)) + 1
        d.get(stream=s, out=pinned, blocking=False)
        done = s.record()
        more = d * 3                                      # later work does not land it
    assert np.isnan(pinned).all()
    done.synchronize()
    assert pinned.tolist() == [1, 2, 3, 4]
    assert more.get(stream=s).tolist() == [3, 6, 9, 12]


def test_an_upload_from_pinned_memory_reads_it_when_the_stream_gets_there():
    """Host -> device from a pinned buffer that the host rewrites (the next MPI receive)
    before the copy ran: the device gets the new contents; after a fence, the old."""
    s = cp.cuda.Stream(non_blocking=True)
    pinned = np.frombuffer(cp.cuda.alloc_pinned_memory(16), np.float32, 4)
    for fenced in (False, True):
        pinned[:] = 1
        with s:
            d = cp.empty(4, dtype=np.float32)
            d.set(pinned, stream=s)
            if fenced:
                s.record().synchronize()
        pinned[:] = 2                                      # MPI receives into it again
        assert d.get(stream=s).tolist() == ([1] * 4 if fenced else [2] * 4)


def test_a_freed_block_goes_to_the_next_allocation_on_its_stream_poisoned():
    s, other = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    pinned = np.frombuffer(cp.cuda.alloc_pinned_memory(4096), np.float32, 1024)
    with s:
        a = cp.asarray(np.full(1024, 7, np.float32))
    other.wait_event(s.record())
    a.get(stream=other, out=pinned, blocking=False)       # queued on another stream
    address = a.ctypes.data
    del a                                                 # freed while that copy is queued
    with s:
        b = cp.empty(1024, dtype=np.float32)               # the same block, poisoned
        assert b.ctypes.data == address
    other.synchronize()
    assert np.isnan(pinned).all()                         # the copy read the new owner's bytes
    with s:                                               # on its own stream: stream order
        c = cp.asarray(np.full(1024, 5, np.float32))
        c.get(stream=s, out=pinned, blocking=False)
        del c
        cp.zeros(1024, dtype=np.float32)
    s.synchronize()
    assert (pinned == 5).all()


def test_pinned_memory_is_reused_by_the_next_allocation_of_its_size():
    mem = cp.cuda.alloc_pinned_memory(1000)
    address = np.frombuffer(mem, np.uint8).ctypes.data
    del mem
    again = cp.cuda.alloc_pinned_memory(1000)
    assert np.frombuffer(again, np.uint8).ctypes.data == address


def round_trip(backend, precision="fp32", n=64, hidden=8, experts=2):
    """One dispatch + combine on COMM_SELF; returns (sent rows [n, H], returned [n, K, H])."""
    comm = MPI.COMM_SELF
    placement = Placement.default(experts, 1, [0])
    rng = np.random.default_rng(0)
    topk_idx = np.stack([rng.permutation(experts)[:2] for _ in range(n)]).astype(np.int32)
    dest = assign_replicas(topk_idx, *placement.replica_table(0, 0), 0)
    h = np.round(rng.standard_normal((n, hidden)) * 8).astype(np.float32)   # exact in BF16
    ex = Exchanger(comm, hidden, experts, precision, backend=backend)
    try:
        with backend.running():
            plan = drive(ex.plan(topk_idx, dest, [0, 1]))
            recv = drive(ex.dispatch(plan, backend.to_device(h)))
            back = backend.to_host(ex.per_token(drive(ex.combine(plan, recv)), plan, n))
    finally:
        ex.close()
    return h, back


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_exchange_round_trip_on_the_device_path(precision):
    h, back = round_trip(DeviceBackend(cp, 0, cuda_aware=False, name="standin"), precision)
    assert (back == h[:, None, :]).all()


def test_undo_the_fix_mpi_before_the_staged_copy_landed(monkeypatch):
    """Take out the wait for a staged send buffer's event: MPI sends poison."""
    monkeypatch.setattr(Exchanger, "_ready", lambda self, ready: iter(()))
    h, back = round_trip(DeviceBackend(cp, 0, cuda_aware=False, name="standin"))
    assert np.isnan(back).any()


def test_undo_the_fix_the_stream_set_by_use(monkeypatch):
    """Make the stream current with use() instead of naming it around the forward pass, as
    the backend did before: the first ``with`` inside it sends later kernels to the null
    stream, which the stand-in refuses as the unordered race it is on a GPU."""
    monkeypatch.setattr(DeviceBackend, "running", lambda self: contextlib.nullcontext())
    backend = DeviceBackend(cp, 0, cuda_aware=False, name="standin")
    backend.stream.use()
    with pytest.raises(cp.StreamOrderError):
        round_trip(backend)
