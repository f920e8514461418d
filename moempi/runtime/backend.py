"""Array backends: numpy on the CPU, CuPy on a GPU (or its numpy stand-in); the one module that imports cupy.

A backend owns where arrays live and how exchange buffers reach MPI:

- ``numpy``: host arrays; packing a send buffer is a gather (and BF16 rounding) in place.
- ``cupy``: weights and activations on the rank's GPU, and **one stream** that this code
  names for every kernel and every copy (:meth:`DeviceBackend.running`; never
  ``Stream.use()``, which CuPy forgets when any ``with stream:`` block exits).  Without
  CUDA-aware MPI, send and receive buffers are pinned host memory: a device-to-host copy
  then an event before MPI reads a send buffer, the host-to-device copy of a received
  buffer on the same stream after the receive.  With CUDA-aware MPI, device buffers go to
  MPI directly, once the stream work that fills them is complete.
- ``standin``: the same GPU code on :mod:`moempi.runtime.cupy_standin`, which reproduces CuPy's
  stream, copy and pool ordering rules on numpy, for CI.

In ``bf16`` mode on a device the received wire bits feed the first expert GEMM directly
(cuBLAS, float32 accumulation, BF16 result), the activation is one fused elementwise
kernel on the BF16 bits, and the expert output goes onto the wire as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import ml_dtypes
import numpy as np

from moempi.errors import MoempiError
from moempi.model.arrays import BF16, decode_bf16, encode_bf16, round_bf16, weighted_rows
from moempi.model.experts import ACTIVATIONS, expert_mlp, gated_mlp_bf16, mlp_bf16
from moempi.runtime import cupy_standin


# The activations as one fused CUDA kernel on BF16 bits, in place: widen, activate in
# float32, round to nearest even (NaN kept).  Each has a numpy twin for the stand-in.
_BF16_ACTIVATION = """
float v = __uint_as_float(((unsigned int)x) << 16);
float r = {expr};
unsigned int u = __float_as_uint(r);
y = ((u & 0x7fffffffu) > 0x7f800000u) ? (unsigned short)((u >> 16) | 0x40u)
    : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
"""
_ACTIVATION_EXPR = {
    "silu": "v / (1.0f + expf(-v))",
    "gelu": "0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)))",
    "relu": "fmaxf(v, 0.0f)",
}


# The gated MLP's elementwise step as one fused kernel on BF16 bits, in place on ``g``:
# act(widened g) * widened u in float32, rounded to nearest even (NaN kept).
_BF16_GATE_PRODUCT = """
float v = __uint_as_float(((unsigned int)g) << 16);
float r = ({expr}) * __uint_as_float(((unsigned int)u) << 16);
unsigned int b = __float_as_uint(r);
y = ((b & 0x7fffffffu) > 0x7f800000u) ? (unsigned short)((b >> 16) | 0x40u)
    : (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
"""


def _gate_product_twin(name):
    """What the fused kernel computes, on numpy: ``twin(g_bits, u_bits, out_bits)``."""
    def twin(g, u, out):
        a, b = np.empty(g.shape, np.float32), np.empty(u.shape, np.float32)
        decode_bf16(np, g, a)
        decode_bf16(np, u, b)
        a = ACTIVATIONS[name](a)
        a *= b
        encode_bf16(np, a, out)
    return twin


def _activation_twin(name):
    """What the fused kernel ``name`` computes, on numpy: ``twin(bits_in, bits_out)``."""
    def twin(bits, out):
        x = np.empty(bits.shape, np.float32)
        decode_bf16(np, bits, x)
        encode_bf16(np, ACTIVATIONS[name](x), out)
    return twin


class Ready:
    """A GPU event as something the scheduler can poll, like an ``MPI.Request``.

    ``keep`` holds every array the event's work still reads or writes (source and
    destination): CuPy's pools must not hand their memory to another allocation before
    that work is done.
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
    """numpy on the CPU: every step is synchronous.

    ``kernels``: the exchange's local steps compiled into one pass each
    (:func:`moempi.model.fused.load`, same bits), or None for the numpy steps.
    """

    name = "numpy"
    xp = np
    gpu = False
    device_buffers = False

    def __init__(self, kernels=None):
        self.kernels = kernels

    def running(self):
        """The context the forward pass runs in (on a device: its stream current)."""
        return contextlib.nullcontext()

    def to_device(self, a: np.ndarray, dtype=np.float32):
        return np.array(a, dtype=dtype)           # a copy: the caller's array stays intact

    def to_host(self, a) -> np.ndarray:
        return a

    def index(self, idx: np.ndarray):
        return idx

    def empty(self, shape, dtype):
        """An exchange buffer: host memory."""
        return np.empty(shape, dtype=dtype)

    def fence(self):
        """A :class:`Ready` covering all work issued so far, or None when all is done."""
        return None

    def mlp(self, h, w_in, w_out, activation: str, out=None, w_gate=None):
        """The expert MLP (gated with ``w_gate``), into ``out`` (a contiguous block of the
        output) when given."""
        weights = (w_in, w_out) if w_gate is None else (w_in, w_out, w_gate)
        return expert_mlp(h, weights, activation, out)

    def pack(self, rows_of, idx, out, bf16: bool, scratch=None):
        """Gather ``rows_of[idx]`` into the send buffer ``out`` (BF16-rounded if asked, through
        ``scratch``: uint16 rows like ``rows_of``)."""
        if bf16 and self.kernels:
            self.kernels.pack_bf16(rows_of, idx, out)
        elif bf16:
            round_bf16(rows_of, out, idx, scratch)
        else:               # mode "clip": numpy buffers ``out`` in the checking mode (3x slower)
            np.take(rows_of, idx, axis=0, out=out, mode="clip")
        return None

    def pack_all(self, rows, out, bf16: bool):
        """Copy ``rows`` whole into the send buffer ``out``."""
        if bf16:
            round_bf16(rows, out)
        elif not (rows.ctypes.data == out.ctypes.data and rows.shape == out.shape):
            out[...] = rows                 # (the experts did not write in place)
        return None

    def weighted_sum(self, x, back, pos, weights) -> None:
        """``x[n] += sum_k weights[n, k] * back[pos[n, k]]`` (``back`` float32 or BF16 bits;
        ``pos`` -1 where dropped), as :func:`moempi.model.arrays.weighted_rows` does."""
        if self.kernels:
            self.kernels.weighted_sum(x, back, pos, weights)
        else:
            weighted_rows(x, back, pos, weights)

    def unpack(self, buf, bf16: bool, scratch, keep_bf16: bool = False):
        """A received buffer as float32 rows (``scratch`` holds the decoded copy for BF16;
        ``keep_bf16`` is for the device, whose BF16 GEMMs take the wire's rows as they are)."""
        if not bf16:
            return buf
        # an ml_dtypes cast: 4.3 ms for 1024 x 7168 here, integer widening took 5.9 ms
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
    """CuPy (or the stand-in) on one GPU: one named stream, events for staged buffers."""

    gpu = True

    def __init__(self, cp, device: int, cuda_aware: bool, name: str = "cupy"):
        super().__init__()
        self.cp = self.xp = cp
        self.name = name
        self.device = device
        cp.cuda.Device(device).use()
        # one stream for every kernel and copy of this rank: stream order alone makes each
        # copy and kernel see the one before it, and CuPy's pool, which hands a freed block
        # to the next allocation on the same stream, is then safe by construction
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.device_buffers = cuda_aware
        self._activations = {}

    def running(self):
        return self.stream

    def _on_stream(self) -> None:
        """Kernels must go to this backend's stream: a ``with`` block left elsewhere (or a
        ``use()``) would send them to the null stream, which ours does not wait for."""
        if self.cp.cuda.get_current_stream() != self.stream:
            raise RuntimeError("GPU work issued outside the backend's stream (run it inside "
                               "DeviceBackend.running())")

    def to_device(self, a, dtype=np.float32):
        with self.stream:
            return self.cp.asarray(np.ascontiguousarray(a, dtype=dtype))

    def to_host(self, a) -> np.ndarray:
        return a.get(stream=self.stream)        # blocking: the stream is synchronized

    def index(self, idx: np.ndarray):
        with self.stream:
            return self.cp.asarray(idx)

    def empty(self, shape, dtype):
        if self.device_buffers:
            with self.stream:
                return self.cp.empty(shape, dtype=dtype)
        count = int(np.prod(shape))
        mem = self.cp.cuda.alloc_pinned_memory(count * np.dtype(dtype).itemsize)
        return np.frombuffer(mem, dtype=dtype, count=count).reshape(shape)

    def fence(self):
        return Ready(self.stream.record())

    def mlp(self, h, w_in, w_out, activation: str, out=None, w_gate=None):
        """The expert MLP (gated with ``w_gate``) on the stream (``out`` is for the host's;
        the caller stores)."""
        self._on_stream()
        if h.dtype == BF16 and w_in.dtype == BF16:
            if w_gate is not None:
                return gated_mlp_bf16(h, w_gate, w_in, w_out, self._gate_product(activation))
            return mlp_bf16(h, w_in, w_out, self._activation(activation))
        if h.dtype == BF16:
            h = h.astype(np.float32)
        weights = (w_in, w_out) if w_gate is None else (w_in, w_out, w_gate)
        return expert_mlp(h, weights, activation)

    def _gate_product(self, name):
        """The fused ``act(g) * u`` kernel on `[N, F]` BF16 intermediates, in place on ``g``."""
        key = ("gated", name)
        if key not in self._activations:
            args = ("uint16 g, uint16 u", "uint16 y",
                    _BF16_GATE_PRODUCT.format(expr=_ACTIVATION_EXPR[name]),
                    f"moempi_gated_{name}_bf16")
            if self.cp is cupy_standin:
                kernel = cupy_standin.ElementwiseKernel(*args, twin=_gate_product_twin(name))
            else:
                kernel = self.cp.ElementwiseKernel(*args)

            def product(g, u):
                bits = g.view(self.cp.uint16)
                kernel(bits, u.view(self.cp.uint16), bits)
                return g
            self._activations[key] = product
        return self._activations[key]

    def _activation(self, name):
        """The fused BF16 activation kernel ``name``, in place on ``[N, F]`` BF16 rows."""
        if name not in self._activations:
            args = ("uint16 x", "uint16 y", _BF16_ACTIVATION.format(expr=_ACTIVATION_EXPR[name]),
                    f"moempi_{name}_bf16")
            if self.cp is cupy_standin:
                kernel = cupy_standin.ElementwiseKernel(*args, twin=_activation_twin(name))
            else:
                kernel = self.cp.ElementwiseKernel(*args)

            def activate(z):
                bits = z.view(self.cp.uint16)
                kernel(bits, bits)
                return z
            self._activations[name] = activate
        return self._activations[name]

    def _wire(self, rows, bf16):
        """``rows`` as the wire carries them: BF16 bits (rounded here unless already BF16)."""
        if not bf16:
            return rows
        if rows.dtype == BF16:
            return rows.view(self.cp.uint16)
        wire = self.cp.empty(rows.shape, dtype=self.cp.uint16)
        encode_bf16(self.cp, rows, wire)
        return wire

    def _send(self, wire, out):
        """Make ``wire`` (device) the content of the send buffer ``out``; a Ready when MPI
        may read ``out``: the stream has finished the copy into it."""
        if self.device_buffers:
            out[...] = wire
        else:
            wire.get(stream=self.stream, out=out, blocking=False)
        return Ready(self.stream.record(), (wire, out))

    def pack(self, rows_of, idx, out, bf16: bool, scratch=None):
        with self.stream:
            self._on_stream()
            return self._send(self._wire(rows_of[idx], bf16), out)

    def pack_all(self, rows, out, bf16: bool):
        with self.stream:
            self._on_stream()
            return self._send(self._wire(rows, bf16), out)

    def unpack(self, buf, bf16: bool, scratch=None, keep_bf16: bool = False):
        """A received buffer on the device: float32 rows, or (``keep_bf16``, BF16 wire) the
        BF16 rows as they came.  The copy is issued after the receive completed, on the
        stream, so later kernels see it; :meth:`fence` afterwards covers the buffer's use."""
        cp = self.cp
        with self.stream:
            self._on_stream()
            if self.device_buffers:
                dev = buf.copy()            # MPI writes ``buf`` again at the next exchange
            else:
                dev = cp.empty(buf.shape, dtype=buf.dtype)
                dev.set(buf, stream=self.stream)
            if not bf16:
                return dev
            if keep_bf16:
                return dev.view(ml_dtypes.bfloat16)
            out = cp.empty(buf.shape, dtype=cp.float32)
            decode_bf16(cp, dev, out)
            return out

    def synchronize(self) -> None:
        self.stream.synchronize()

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
