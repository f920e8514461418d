"""Diagnosis under mpiexec, for a GPU machine: where the device exchange goes wrong.

    mpiexec -n 2 python tests/gpu_exchange_debug.py cupy [HIDDEN] [TOKENS]
    mpiexec -n 2 python tests/gpu_exchange_debug.py cupy d2h

The first form prints, per rank and round, the first step of the device exchange whose
result differs from the host backend's (plan, pack, mpi, unpack, combine, unpermute), after
checks of plain transfers into views of a staging buffer and of the experts' chunked
compute.  The second counts wrong host<->device copies of several kinds while the other
ranks use the GPU too.  The stand-in (``standin``) runs both without a GPU.
"""

import sys

import numpy as np
from mpi4py import MPI

from moempi.backend import HostBackend, make_backend
from moempi.dispatch import Exchanger, drive
from moempi.placement import Placement, assign_replicas


def same(a, b) -> str:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape}"
    bad = np.flatnonzero((a != b).reshape(len(a), -1).any(axis=1)) if len(a) else []
    return "" if len(bad) == 0 else f"{len(bad)}/{len(a)} rows differ, first {bad[:5].tolist()}"


def d2h(comm, name):
    """Device-to-host copies into fresh pageable memory (cupy.asnumpy) and through the
    backend's to_host, while other ranks use the GPU: how many come back wrong."""
    import os
    dev = make_backend(name, comm)
    cp = dev.cp
    bad = {"asnumpy": 0, "to_host": 0}
    for i in range(60):
        with dev.compute:
            a = cp.full((3 << 20,), float(i + 1000 * comm.rank), dtype=cp.float32)   # 12 MB
            b = a * 1                                                          # more queued work
        bad["asnumpy"] += int((cp.asnumpy(b, stream=dev.compute) != i + 1000 * comm.rank).any())
        dev.compute.synchronize()
        bad["to_host"] += int((dev.to_host(b) != i + 1000 * comm.rank).any())
    # small copies into reused host memory (numpy's heap hands back the same blocks), and
    # uploads from one pinned buffer rewritten by the CPU before each copy: stale data here
    # would mean the copies and the CPU's caches disagree
    small = {"d2h": 0, "h2d": 0}
    pinned = np.frombuffer(cp.cuda.alloc_pinned_memory(1 << 22), np.int32)
    for i in range(200):
        with dev.compute:
            a = cp.full((4096,), i, dtype=cp.int32)
        small["d2h"] += int((cp.asnumpy(a, stream=dev.compute) != i).any())
        pinned[:] = i
        with dev.compute:
            d = cp.empty(pinned.shape, dtype=cp.int32)
            d.set(pinned, stream=dev.compute)
            wrong = cp.count_nonzero(d != i)
        small["h2d"] += int(cp.asnumpy(wrong, stream=dev.compute)) > 0
    ump = os.environ.get("CUPY_ENABLE_UMP")
    lines = comm.gather(f"rank {comm.rank} d2h, 60 copies of 12 MB: wrong after asnumpy "
                        f"{bad['asnumpy']}, after to_host {bad['to_host']}; 200 copies of 16 KB "
                        f"into reused host memory: wrong {small['d2h']}; 200 uploads of a "
                        f"rewritten 4 MB pinned buffer: wrong {small['h2d']} "
                        f"(CUPY_ENABLE_UMP={ump})", root=0)
    for line in lines or []:
        print(line)


def main():
    comm = MPI.COMM_WORLD
    name = sys.argv[1]
    if len(sys.argv) > 2 and sys.argv[2] == "d2h":
        return d2h(comm, name)
    H = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    N = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    dev = make_backend(name, comm)
    K, E = 2, 2 * comm.size
    placement = Placement.default(E, comm.size, [0])
    local = placement.experts_on(0, comm.rank)
    report = []
    # the transfers alone, into and out of views of a larger staging buffer
    xp, m = dev.xp, 300
    big = dev.empty((3 * m, H), np.float32)
    a = dev.to_device(np.random.default_rng(comm.rank).standard_normal((m, H)).astype(np.float32))
    want = dev.to_host(a)
    for lo in (0, m):
        dev.copy.wait_event(dev.compute.record())
        a.get(stream=dev.copy, out=big[lo:lo + m], blocking=False)
        dev.copy.synchronize()
        d = xp.empty((m, H), dtype=xp.float32)
        dev.copy.wait_event(dev.compute.record())
        d.set(big[lo:lo + m], stream=dev.copy)
        dev.copy.synchronize()
        report.append(f"rank {comm.rank} transfer at row {lo}: get {same(big[lo:lo + m], want) or 'ok'}"
                      f", set {same(dev.to_host(d), want) or 'ok'}")
    for blocking in (True, False):
        hx = Exchanger(comm, H, E, "fp32", blocking, backend=HostBackend())
        dx = Exchanger(comm, H, E, "fp32", blocking, backend=dev)
        for rnd, n in enumerate([N // 4, N, N // 2, 2 * N]):
            rng = np.random.default_rng([rnd, comm.rank])
            topk = np.stack([rng.permutation(E)[:K] for _ in range(n)]).astype(np.int32)
            dest = assign_replicas(topk, *placement.replica_table(0, comm.rank), comm.rank)
            h = rng.standard_normal((n, H)).astype(np.float32)
            stages = {}
            ph = drive(hx.plan(topk, dest, local))
            pd = drive(dx.plan(topk, dest, local))
            stages["plan"] = same(ph.pair_order, pd.pair_order) + same(ph.recv_counts, pd.recv_counts)
            rh = drive(hx.dispatch(ph, h))
            send_h = hx._buffers["dispatch_send"][:ph.num_send].copy()
            # the device dispatch, step by step (as Exchanger.dispatch does it)
            hd = dev.to_device(h)
            dx._order = dev.index(pd.pair_order)
            send = dx._buffer("dispatch_send", pd.num_send)
            dev.pack(hd, dx._order // K, send, False).wait()
            stages["pack"] = same(send, send_h)
            recv = dx._buffer("dispatch_recv", pd.num_recv)
            dx.comm.Alltoallv([send, (pd.send_counts, pd.send_displs), dx.rowtype],
                              [recv, (pd.recv_counts, pd.recv_displs), dx.rowtype])
            stages["mpi"] = same(recv, rh)
            rd = dev.unpack(recv, False)
            stages["unpack"] = same(dev.to_host(rd), rh)
            # combine with y = recv, through the real generator, then by hand
            bh = drive(hx.combine(ph, rh.copy(), n))
            bd = dev.to_host(drive(dx.combine(pd, dev.to_device(rh), n)))
            stages["combine"] = same(bd.reshape(n * K, H), bh.reshape(n * K, H))
            back = hx._buffers["combine_recv"][:ph.num_send]
            bdev = dev.unpack(np.ascontiguousarray(back), False)
            stages["unpermute"] = same(dev.to_host(pd.unpermute(bdev, n, dx._order)).reshape(n * K, H),
                                       ph.unpermute(back, n).reshape(n * K, H))
            first = next(((k, v) for k, v in stages.items() if v), None)
            report.append(f"rank {comm.rank} {'blocking' if blocking else 'nonblocking'} round "
                          f"{rnd} n={n}: " + ("all stages equal" if first is None else
                                               f"FIRST DIFFERENCE at {first[0]}: {first[1]}; "
                                               f"others: {[k for k, v in stages.items() if v]}"))
        hx.close()
        dx.close()
    # the experts' chunked compute of pipeline.MicroBatch._experts, on the device and on numpy
    from moempi.experts import mlp
    from moempi.pipeline import CHUNK_FLOP, CHUNK_ROWS
    F, R = 2048, 1500
    rng = np.random.default_rng(7 + comm.rank)
    recv = rng.standard_normal((R, H)).astype(np.float32)
    w = [((rng.standard_normal((H, F)) * H**-0.5).astype(np.float32),
          (rng.standard_normal((F, H)) * F**-0.5).astype(np.float32)) for _ in range(2)]
    order = rng.permutation(R)
    chunk = max(CHUNK_ROWS, int(CHUNK_FLOP / (4 * H * F)))
    results = {}
    for b in (HostBackend(), dev):
        r, y = b.to_device(recv), b.xp.empty((R, H), dtype=b.xp.float32)
        wd = [(b.to_device(a), b.to_device(c)) for a, c in w]
        for e, rows in enumerate((order[: R // 3], order[R // 3:])):
            for s in range(0, len(rows), chunk):
                part = b.index(rows[s:s + chunk])
                y[part] = mlp(r[part], *wd[e], "silu")
        results[b.name] = b.to_host(y)
    err = np.abs(results[dev.name] - results["numpy"]).max() / np.abs(results["numpy"]).max()
    report.append(f"rank {comm.rank} experts, {R} rows in chunks of {chunk}: max rel diff {err:.1e}")
    for r, lines in enumerate(comm.gather(report, root=0) or []):
        for line in lines:
            print(line)


if __name__ == "__main__":
    main()
