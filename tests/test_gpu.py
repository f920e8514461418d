"""The GPU backend over every available array backend: the numpy stand-in always, CuPy on a GPU.

One test body per backend through a small registry (``MOEMPI_TEST_BACKENDS`` overrides it,
e.g. ``cupy`` in `make gpu-check`, where a missing GPU must fail rather than skip).
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from conftest import mpirun, reference
from reference import rel_l2


def _cupy_usable() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


REQUESTED = os.environ.get("MOEMPI_TEST_BACKENDS")
BACKENDS = REQUESTED.split(",") if REQUESTED else ["standin", "cupy"]


def backend_param(name):
    if name == "cupy" and not REQUESTED and not _cupy_usable():
        return pytest.param(name, marks=pytest.mark.skip(reason="no CuPy with a visible GPU"))
    return name


@pytest.fixture(params=[backend_param(b) for b in BACKENDS])
def backend(request):
    return request.param


def use(backend) -> list:
    """``--set`` arguments that select ``backend`` (CuPy is refused unless asked for explicitly)."""
    return ["--set", f"backend.name={backend}",
            *(["--set", "backend.unverified_gpu=true"] if backend == "cupy" else [])]


# bf16 against the float64 reference on the tiny model (BF16 weights, intermediate and
# output in the expert GEMMs, BF16 on the wire): measured 5.1e-3 on the stand-in at 1 to 4
# ranks (the numpy backend, BF16 on the wire alone: 2.0e-3)
BF16_BOUND = 1.5e-2


def hidden(path):
    with h5py.File(path, "r") as f:
        return f["hidden"][()]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_gpu_path_matches_reference(files, tmp_path, backend, n):
    """fp32 within 1e-4 of float64 and bf16 within its bound, at 1 to 4 ranks sharing one
    GPU, staged through pinned memory; at 2 ranks, staged equals CUDA-aware."""
    ref = reference(files / "e4.h5", files / "tok.h5")
    outs = {}
    for precision, aware in [("fp32", "no"), ("bf16", "no"), *([("fp32", "yes")] if n == 2 else [])]:
        out = tmp_path / f"{precision}-{aware}.h5"
        args = ["run", "--model", files / "e4.h5", "--tokens", files / "tok.h5", "-o", out,
                *use(backend), "--set", f"backend.cuda_aware={aware}", "--precision", precision,
                "--micro-batches", "2"]
        takes = mpi_takes_device_buffers(backend) if aware == "yes" else "yes"
        if takes == "unknown":
            continue                              # the library cannot say: nothing to check
        if takes == "no":
            # device buffers into an MPI without CUDA support: refused, not crashed
            proc = mpirun(n, *args, check=False)
            assert proc.returncode != 0 and "reports no CUDA support" in proc.stderr
            assert not out.exists()
            continue
        mpirun(n, *args)
        outs[precision, aware] = hidden(out)
        err = rel_l2(outs[precision, aware], ref)
        assert err <= 1e-4 if precision == "fp32" else 1e-5 < err <= BF16_BOUND
    if ("fp32", "yes") in outs:
        assert rel_l2(outs["fp32", "yes"], outs["fp32", "no"]) <= 1e-6


def mpi_takes_device_buffers(backend) -> str:
    """yes, no or unknown.  The stand-in's "device" buffers are host memory: any MPI takes
    them.  For CuPy, ask the MPI library, as `moempi info` does."""
    if backend == "standin":
        return "yes"
    proc = mpirun(1, "info", "--backend", backend)
    line = next(l for l in proc.stdout.splitlines() if l.strip().startswith("cuda-aware:"))
    return line.split(":", 1)[1].split()[0]


def test_blocking_with_micro_batches_enters_collectives_in_order(files, tmp_path, backend):
    """GPU work finishing in another order on each rank must not reorder blocking exchanges."""
    ref = reference(files / "e4.h5", files / "tok.h5")
    out = tmp_path / "b.h5"
    mpirun(2, "run", "--model", files / "e4.h5", "--tokens", files / "tok.h5", "-o", out,
           *use(backend), "--no-overlap", "--micro-batches", "3",
           timeout=60)
    assert rel_l2(hidden(out), ref) <= 1e-4


def test_a_rank_without_gpu_ends_the_job(files, tmp_path):
    """One rank sees no GPU: every rank stops with its message (no collective left waiting)."""
    import subprocess
    from conftest import MOEMPI, MPIEXEC, MPI_ENV
    args = ["run", "--model", str(files / "e4.h5"), "--tokens", str(files / "tok.h5"),
            "-o", str(tmp_path / "o.h5"), "--set", "backend.name=standin"]
    cmd = [MPIEXEC, "-n", "1", "-env", "MOEMPI_STANDIN_GPUS", "0", *MOEMPI, *args, ":",
           "-n", "1", *MOEMPI, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, **MPI_ENV, "MPIEXEC_TIMEOUT": "40"})
    assert proc.returncode != 0 and "no GPU visible" in proc.stderr
    assert not (tmp_path / "o.h5").exists()


def test_device_binding_by_node_local_rank(backend):
    """Ranks take device ``local rank mod visible GPUs``: two stand-in GPUs, four ranks."""
    env = {"MOEMPI_STANDIN_GPUS": "2"}
    proc = mpirun(4, "info", "--backend", backend, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.strip().startswith("rank ")]
    assert len(lines) == 4
    if backend == "standin":
        assert [" GPU 0 " in l for l in lines] == [True, False, True, False]
        assert all(f"local rank {r}/4" in l for r, l in enumerate(lines))


def test_staged_buffers_report_readiness_through_events():
    """The stand-in's events are 'not ready' once: a staged send must be polled, then go."""
    from moempi.runtime import cupy_standin
    from moempi.runtime.backend import DeviceBackend
    backend = DeviceBackend(cupy_standin, 0, cuda_aware=False, name="standin")
    h = backend.to_device(np.arange(12, dtype=np.float32).reshape(4, 3))
    out = backend.empty((2, 3), np.float32)
    assert isinstance(out, np.ndarray) and not isinstance(out, cupy_standin.ndarray)  # pinned host
    ready = backend.pack(h, backend.index(np.array([3, 1])), out, bf16=False)
    assert ready.Test() is False and ready.keep                # still copying: keep the source
    assert np.isnan(out).all()                # MPI must not read it yet: not landed
    while not ready.Test():
        pass
    assert ready.keep == ()
    assert out.tolist() == [[9, 10, 11], [3, 4, 5]]
    with backend.running():
        back = backend.unpack(out, bf16=False)
    assert isinstance(back, cupy_standin.ndarray)
    assert backend.to_host(back).tolist() == out.tolist()


def test_gpu_bench_table(backend):
    proc = mpirun(2, "bench", "gpu", "--backend", backend, *(["--quick"] if backend == "standin" else []),
                  timeout=300)
    assert "expert MLP" in proc.stdout and "overlap" in proc.stdout and "forward" in proc.stdout


def test_standin_refuses_a_copy_that_races_the_compute_stream():
    """CuPy reuses a freed block for the next allocation on the same stream, while kernels
    queued there may still use it: a copy on another stream must wait for that stream first."""
    from moempi.runtime import cupy_standin as cp
    compute, copy = cp.cuda.Stream(), cp.cuda.Stream()
    with compute:
        dev = cp.empty((2, 3), dtype=np.float32)
    host = np.ones((2, 3), np.float32)
    with pytest.raises(cp.StreamOrderError):
        dev.set(host, stream=copy)
    with pytest.raises(cp.StreamOrderError):
        dev[1:].get(stream=copy)                       # a view carries its array's stream
    copy.wait_event(compute.record())
    dev.set(host, stream=copy)
    assert dev.get(stream=copy).tolist() == host.tolist()
    with compute:
        later = cp.empty((2, 3), dtype=np.float32)     # allocated after that wait: not covered
    with pytest.raises(cp.StreamOrderError):
        later.set(host, stream=copy)


@pytest.mark.parametrize("precision,bound", [("fp32", 1e-4), ("bf16", BF16_BOUND)])
def test_tensor_parallel_on_the_gpu_path(files, tmp_path, backend, precision, bound):
    """(ep, tp) = (2, 2): each shard's GEMMs on the device, the pair weights repeated there."""
    out = tmp_path / "tp.h5"
    mpirun(4, "run", "--model", files / "e4.h5", "--tokens", files / "tok.h5", "--output", out,
           "--set", "parallel.ep=2", "--set", "parallel.tp=2", "--micro-batches", "2",
           "--precision", precision, *use(backend), timeout=180)
    assert rel_l2(hidden(out), reference(files / "e4.h5", files / "tok.h5")) <= bound
