"""Array backends: numpy on the CPU, CuPy on a GPU (or its numpy stand-in); the one module that imports cupy.

A backend owns where arrays live and how exchange buffers reach MPI:

- ``numpy``: host arrays; packing a send buffer is a gather (and BF16 rounding) in place.
- ``cupy``: weights and activations on the rank's GPU; expert compute on a compute stream,
  host<->device copies on a copy stream, events mark buffer readiness.  Without CUDA-aware
  MPI, send/receive buffers are pinned host memory reused across steps; with it, device
  buffers go to MPI directly, once the stream work that fills them is complete.
- ``standin``: the same GPU code on :mod:`moempi.cupy_standin` (numpy), for CI.
"""

from __future__ import annotations

import ctypes
import os
import sys

import ml_dtypes
import numpy as np

from . import cupy_standin
from .errors import MoempiError


def array_module(x):
    """The array module an array belongs to (numpy, cupy or the stand-in), without importing cupy."""
    if isinstance(x, cupy_standin.ndarray):
        return cupy_standin
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np
    return sys.modules[type(x).__module__.split(".")[0]]


# -- BF16 on the wire: uint16 bit patterns, round to nearest even -------------------------
def encode_bf16(xp, x, out) -> None:
    """float32 ``x`` -> BF16 bits in ``out`` (uint16), on any array module."""
    u = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    out[...] = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(xp.uint16)


def decode_bf16(xp, bits, out) -> None:
    """BF16 bits (uint16) -> float32 ``out``, exactly."""
    out.view(xp.uint32)[...] = bits.astype(xp.uint32) << 16


class Ready:
    """A GPU event as something the scheduler can poll, like an ``MPI.Request``.

    ``keep`` holds the device arrays the event's work still reads: CuPy's pool must not
    hand their memory to another allocation before the copy that reads them is done.
    """

    def __init__(self, event, keep=()):
        self.event = event
        self.keep = keep

    def Test(self) -> bool:
        if self.event.done:
            self.keep = ()
            return True
        return False

    def wait(self) -> None:
        self.event.synchronize()
        self.keep = ()


class HostBackend:
    """numpy on the CPU: every step is synchronous."""

    name = "numpy"
    xp = np
    gpu = False
    device_buffers = False

    def to_device(self, a: np.ndarray, dtype=np.float32):
        return np.array(a, dtype=dtype)           # a copy: the caller's array stays intact

    def to_host(self, a) -> np.ndarray:
        return a

    def index(self, idx: np.ndarray):
        return idx

    def empty(self, shape, dtype):
        """An exchange buffer: host memory."""
        return np.empty(shape, dtype=dtype)

    def pack(self, rows_of, idx, out, bf16: bool):
        """Gather ``rows_of[idx]`` into the send buffer ``out`` (BF16-rounded if asked)."""
        if bf16:
            np.copyto(out.view(ml_dtypes.bfloat16), rows_of[idx], casting="unsafe")
        else:
            np.take(rows_of, idx, axis=0, out=out)
        return None

    def pack_all(self, rows, out, bf16: bool):
        """Copy ``rows`` whole into the send buffer ``out``."""
        if bf16:
            np.copyto(out.view(ml_dtypes.bfloat16), rows, casting="unsafe")
        elif not (rows.ctypes.data == out.ctypes.data and rows.shape == out.shape):
            out[...] = rows                 # (the experts did not write in place)
        return None

    def unpack(self, buf, bf16: bool, scratch):
        """A received buffer as float32 rows (``scratch`` holds the decoded copy for BF16)."""
        if not bf16:
            return buf
        np.copyto(scratch, buf.view(ml_dtypes.bfloat16), casting="unsafe")
        return scratch

    def synchronize(self) -> None:
        pass

    def memory_bytes(self) -> int | None:
        """The device's memory, or None on the host (no GPU memory to check)."""
        return None

    def describe(self) -> str:
        return "cpu (numpy)"


class DeviceBackend(HostBackend):
    """CuPy (or the stand-in) on one GPU: compute stream, copy stream, events, staged buffers."""

    gpu = True

    def __init__(self, cp, device: int, cuda_aware: bool, name: str = "cupy"):
        self.cp = self.xp = cp
        self.name = name
        self.device = device
        cp.cuda.Device(device).use()
        self.compute = cp.cuda.Stream(non_blocking=True)
        self.copy = cp.cuda.Stream(non_blocking=True)
        # every kernel this rank launches (norms, gating, experts, combine) goes to the
        # compute stream; only the host<->device copies run on the copy stream
        self.compute.use()
        self.device_buffers = cuda_aware

    def to_device(self, a, dtype=np.float32):
        with self.compute:
            return self.cp.asarray(np.ascontiguousarray(a, dtype=dtype))

    def to_host(self, a) -> np.ndarray:
        out = self.cp.asnumpy(a, stream=self.compute)
        self.compute.synchronize()
        return out

    def index(self, idx: np.ndarray):
        with self.compute:
            return self.cp.asarray(idx)

    def empty(self, shape, dtype):
        if self.device_buffers:
            return self.cp.empty(shape, dtype=dtype)
        count = int(np.prod(shape))
        mem = self.cp.cuda.alloc_pinned_memory(count * np.dtype(dtype).itemsize)
        return np.frombuffer(mem, dtype=dtype, count=count).reshape(shape)

    def _to_wire(self, rows, bf16):
        if not bf16:
            return rows
        wire = self.cp.empty(rows.shape, dtype=self.cp.uint16)
        encode_bf16(self.cp, rows, wire)
        return wire

    def _send(self, wire, out):
        """Make ``wire`` (device) the content of the send buffer ``out``; a Ready when done."""
        done = self.cp.cuda.Event()
        if self.device_buffers:
            with self.compute:
                out[...] = wire
            done.record(self.compute)   # MPI may read ``out`` once the compute stream got here
            return Ready(done, (wire,))
        filled = self.compute.record()
        self.copy.wait_event(filled)
        with self.copy:
            wire.get(stream=self.copy, out=out, blocking=False)
        done.record(self.copy)
        return Ready(done, (wire,))

    def pack(self, rows_of, idx, out, bf16: bool):
        with self.compute:
            return self._send(self._to_wire(rows_of[idx], bf16), out)

    def pack_all(self, rows, out, bf16: bool):
        with self.compute:
            return self._send(self._to_wire(rows, bf16), out)

    def unpack(self, buf, bf16: bool, scratch=None):
        cp = self.cp
        if self.device_buffers:
            dev = buf
        else:
            dev = cp.empty(buf.shape, dtype=buf.dtype)
            # dev's block comes from the compute stream's pool: kernels queued there before
            # (another micro-batch's, on a block it has freed) may still use it, so the copy
            # waits for them; the compute stream then waits for the copy
            self.copy.wait_event(self.compute.record())
            with self.copy:
                dev.set(buf, stream=self.copy)
            self.compute.wait_event(self.copy.record())
        with self.compute:
            if not bf16:
                return dev
            out = cp.empty(buf.shape, dtype=cp.float32)
            decode_bf16(cp, dev, out)
            return out

    def synchronize(self) -> None:
        self.compute.synchronize()
        self.copy.synchronize()

    def memory_bytes(self) -> int | None:
        return int(self.cp.cuda.runtime.getDeviceProperties(self.device)["totalGlobalMem"])

    def describe(self) -> str:
        props = self.cp.cuda.runtime.getDeviceProperties(self.device)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return f"{self.name} GPU {self.device} ({name}), " + \
            ("CUDA-aware MPI" if self.device_buffers else "staged through pinned host memory")


def mpi_cuda_aware() -> bool | None:
    """Ask the MPI library whether it takes CUDA buffers: True, False, or None if it cannot say.

    Open MPI and MPICH both offer ``MPIX_Query_cuda_support()``; MPICH also
    ``MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, &flag)``.  Neither is standard MPI.
    """
    from mpi4py import MPI
    try:
        lib = ctypes.CDLL(MPI.__file__)
    except OSError:
        return None
    if hasattr(lib, "MPIX_GPU_query_support"):
        flag = ctypes.c_int(0)
        if lib.MPIX_GPU_query_support(0, ctypes.byref(flag)) == 0:
            return bool(flag.value)
    if hasattr(lib, "MPIX_Query_cuda_support"):
        return bool(lib.MPIX_Query_cuda_support())
    return None


def node_local_rank(comm) -> tuple[int, int]:
    """This rank's index among the ranks of its node, and their count (MPI, not the launcher)."""
    from mpi4py import MPI
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.rank, local.size
    finally:
        local.Free()


def make_backend(name: str, comm, cuda_aware: str = "auto"):
    """The backend for this rank.  A GPU rank takes device ``node-local rank mod visible GPUs``:
    ``CUDA_VISIBLE_DEVICES`` (as Slurm's ``--gpus-per-task`` sets it) decides what is visible,
    and several ranks may share one GPU."""
    if name == "numpy":
        return HostBackend()
    # collective first, before anything that may fail on some ranks only (no GPU, no cupy)
    local_rank, _ = node_local_rank(comm)
    if name == "cupy":
        try:
            import cupy as cp
            count = cp.cuda.runtime.getDeviceCount()
        except Exception as exc:   # no cupy, no driver, no device
            raise MoempiError(f"backend cupy: no usable GPU ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    elif name == "standin":
        cp, count = cupy_standin, cupy_standin.cuda.runtime.getDeviceCount()
    else:
        raise MoempiError(f"unknown backend {name!r}")
    if count < 1:
        raise MoempiError(f"backend {name}: no GPU visible (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    aware = {"yes": True, "no": False}.get(cuda_aware)
    library = mpi_cuda_aware() if name == "cupy" else None
    if aware is None:
        aware = bool(library)
    elif aware and library is False:
        # a device pointer handed to an MPI library that takes host memory only crashes
        # inside MPI (or silently reads garbage): refuse before any exchange
        raise MoempiError("backend.cuda_aware=yes, but this MPI library reports no CUDA "
                          "support (MPIX query): use cuda_aware=auto or no, or an MPI built "
                          "with CUDA")
    return DeviceBackend(cp, local_rank % count, aware, name)


def describe_binding(comm, name: str = "cupy") -> str:
    """One line for ``moempi info``: this rank's node, node-local rank and device (collective)."""
    import platform
    local_rank, local_size = node_local_rank(comm)
    where = (f"{platform.node()}, local rank {local_rank}/{local_size}, CUDA_VISIBLE_DEVICES="
             f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}")
    try:
        backend = make_backend(name, comm, "auto")
    except MoempiError as exc:
        return f"{where}: {exc}"
    return f"{where}: {backend.describe()}"
