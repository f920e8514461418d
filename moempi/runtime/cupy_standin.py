"""A numpy stand-in for the part of CuPy moempi uses, faithful where stream ordering matters, for CPU-only CI.

Arrays are a numpy subclass, so "device" and host arrays stay distinguishable: a kernel
given a host array raises ``TypeError`` as CuPy does, and every transfer is explicit.
Nothing here is fast; it is there to make the GPU path's ordering bugs visible on a CPU.
What it reproduces of CuPy and CUDA (the rules the H100 showed we broke):

- **The current stream.**  A per-thread stack whose bottom is the legacy null stream:
  ``with s:`` pushes ``s``; leaving the block makes the stack's previous entry current,
  so a stream set with ``use()`` is forgotten when any ``with`` block exits (CuPy's
  ``_ThreadLocal.push_stream``/``pop_stream``).  Kernels run on the current stream.
- **Copies are queued.**  A host<->device copy is queued on its stream and its
  destination is poisoned at once (all-ones bits: NaN for floats, -1 for integers).  A
  queued copy reads its source when its stream next advances (another kernel or copy on
  that stream, or something ordering it: a wait, a synchronize); a device-to-host copy
  becomes visible in host memory only when the host learns it is done (an event found
  done or synchronized, a stream synchronized, a blocking copy).  So MPI reading a staged
  buffer before its event, a kernel reading a copy's destination from an unordered stream,
  or host memory overwritten under a pending copy, all give wrong numbers, as on a GPU.
- **Kernels** run eagerly, after the work queued before them on their stream.  A kernel or
  copy that touches device memory last written on another stream, with no event of that
  stream waited for (by this stream, or by the host) since, raises
  :class:`StreamOrderError`.  The legacy null stream is ordered with blocking streams,
  never with ``non_blocking=True`` ones.
- **The memory pool.**  Device memory comes from a pool per stream: a freed block goes to
  the next allocation on the stream that allocated it, poisoned, while work queued on other
  streams may still read it.  Pinned host memory comes from a pool that hands a freed block
  to the next allocation of the same size, as CuPy's pinned pool does.
- **Events** report "not ready" for 1 to 3 queries (a different sequence in every process),
  so the scheduler's polling is exercised, and work finishes in different orders on
  different ranks.
"""

from __future__ import annotations

import ctypes
import os
import random
import weakref

import ml_dtypes
import numpy as _np

__version__ = "stand-in (numpy " + _np.__version__ + ")"

_BF16 = _np.dtype(ml_dtypes.bfloat16)
_UNIT = 512                          # allocation granularity, as CuPy's pools round


class StreamOrderError(RuntimeError):
    """Work on one stream touched device memory last written on another, unordered."""


# -- streams ------------------------------------------------------------------------------
class _Stream:
    """A CUDA stream: its work in program order (``seq``), what it was made to wait for."""

    def __init__(self, non_blocking=False, null=False):
        self.non_blocking = non_blocking
        self.is_null = null
        self.device_id = 0
        self.seq = 0                 # operations issued on this stream so far
        self.after = {}              # stream -> latest seq of it this stream is ordered after
        self.queue = []              # copies and waits not yet advanced past, in order
        self.unlanded = []           # device->host copies read but not yet visible on the host
        _streams.add(self)

    @property
    def ptr(self) -> int:
        return 0 if self.is_null else id(self)

    def __enter__(self):
        _stack.append(self)
        _set_current(self)
        return self

    def __exit__(self, *exc):
        _stack.pop()
        _set_current(_stack[-1])     # the stack's previous entry, not what use() set
        return False

    def use(self):
        _set_current(self)
        return self

    def record(self, event=None):
        event = event or _Event()
        event.record(self)
        return event

    def wait_event(self, event):
        if event.stream is None:
            return
        for s, m in event.after.items():
            self.after[s] = max(self.after.get(s, -1), m)
        self.seq += 1
        self.queue.append(_Wait(self.seq, event.stream, event.mark))

    def synchronize(self):
        _observe({**self.after, self: self.seq})

    @property
    def done(self) -> bool:
        self.synchronize()
        return True

    def __repr__(self):
        return f"<stand-in Stream {'null' if self.is_null else hex(id(self))}>"


class _Wait:
    def __init__(self, seq, stream, mark):
        self.seq, self.stream, self.mark = seq, stream, mark

    def advance(self):
        _advance(self.stream, self.mark)


class _Copy:
    """A queued copy between host and device memory: reads ``src``, writes ``dst``."""

    def __init__(self, seq, src, dst, to_host: bool):
        self.seq, self.src, self.dst, self.to_host = seq, src, dst, to_host
        self.data = None

    def advance(self):
        """The device reaches the copy: read the source; a device destination is written."""
        self.data = _np.array(self.src, copy=True)
        self.src = None
        if not self.to_host:
            self.land()

    def land(self):
        self.dst[...] = self.data
        self.dst = self.data = None


_streams = weakref.WeakSet()
_null = _Stream(null=True)
_Stream.null = _null
_stack = [_null]                     # the per-thread stream stack (this stand-in: one thread)
_current = _null
_host_known = {}                     # stream -> latest seq the host knows complete


def _set_current(stream):
    global _current
    _current = stream


def get_current_stream():
    return _current


def _advance(stream, upto):
    """The device runs ``stream``'s queued work up to ``upto`` (copies read their sources)."""
    while stream.queue and stream.queue[0].seq <= upto:
        op = stream.queue.pop(0)
        op.advance()
        if isinstance(op, _Copy) and op.to_host:
            stream.unlanded.append(op)


def _observe(marks: dict):
    """The host learns that each stream's work up to its mark is done: copies land."""
    for stream, upto in marks.items():
        if _host_known.get(stream, 0) >= upto:
            continue
        _advance(stream, upto)
        while stream.unlanded and stream.unlanded[0].seq <= upto:
            stream.unlanded.pop(0).land()
        _host_known[stream] = upto


def _issue(stream) -> int:
    """A new operation on ``stream``: the work queued before it runs first (and, on the
    legacy null stream, every blocking stream's work; on a blocking stream, the null
    stream's).  Returns its sequence number."""
    _advance(stream, stream.seq)
    if stream.is_null:
        for s in list(_streams):
            if not s.non_blocking and s is not stream:
                _advance(s, s.seq)
    elif not stream.non_blocking:
        _advance(_null, _null.seq)
    stream.seq += 1
    return stream.seq


def _ordered(block, stream) -> bool:
    """Is work issued now on ``stream`` ordered after the last write of ``block``?"""
    writer, seq = block.writer
    if writer is None or writer is stream or _host_known.get(writer, 0) >= seq:
        return True
    if stream.after.get(writer, -1) >= seq:
        return True
    # the legacy null stream and blocking streams synchronise with each other
    return (stream.is_null and not writer.non_blocking) or \
        (writer.is_null and not stream.non_blocking)


def _check(arrays, stream, what):
    for a in arrays:
        block = getattr(a, "_block", None)
        if block is not None and not _ordered(block, stream):
            raise StreamOrderError(
                f"stand-in: {what} on {stream!r} touches device memory last written on "
                f"{block.writer[0]!r} without waiting for an event of that stream since")


# -- device memory: a pool per stream ---------------------------------------------------
class _Block:
    """Pool memory: ``raw`` outlives every allocation that borrows it."""

    def __init__(self, nbytes, stream):
        self.raw = _np.empty(nbytes, _np.uint8)
        self.nbytes, self.stream = nbytes, stream
        self.address = self.raw.ctypes.data
        self.writer = (None, 0)

    def contains(self, address) -> bool:
        return self.address <= address < self.address + self.nbytes


_pool: dict = {}                     # stream -> free blocks


def _round(nbytes) -> int:
    return max(_UNIT, -(-int(nbytes) // _UNIT) * _UNIT)


def _take(free: list, size: int):
    """Best fit among ``free`` (blocks or pinned arrays, by ``nbytes``) of at least ``size``,
    at most twice."""
    sizes = [b.nbytes for b in free]
    fits = [i for i, n in enumerate(sizes) if size <= n <= 2 * size]
    return free.pop(min(fits, key=sizes.__getitem__)) if fits else None


def _device_empty(shape, dtype, stream=None):
    """Uninitialised device memory from ``stream``'s pool (a freed block comes back poisoned)."""
    stream = stream or _current
    dtype = _np.dtype(dtype)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    nbytes = int(_np.prod(shape, dtype=_np.int64)) * dtype.itemsize
    seq = _issue(stream)
    free = _pool.setdefault(stream, [])
    block = _take(free, _round(nbytes)) or _Block(_round(nbytes), stream)
    block.raw[...] = 0xFF            # poison
    block.writer = (stream, seq)
    owner = (ctypes.c_uint8 * block.nbytes).from_buffer(block.raw)
    weakref.finalize(owner, free.append, block)     # freed when the last view goes
    flat = _np.frombuffer(owner, dtype=_np.uint8, count=nbytes)
    arr = flat.view(dtype).reshape(shape).view(ndarray)
    arr._block = block
    return arr


def _raw_view(a):
    """``a``'s memory as a plain array that does not keep ``a``'s allocation alive."""
    block = a._block
    return _np.ndarray(a.shape, a.dtype, buffer=block.raw,
                       offset=a.ctypes.data - block.address, strides=a.strides)


# -- pinned host memory ----------------------------------------------------------------
_pinned_free: list = []
_pinned: list = []                   # every pinned block ever made


def alloc_pinned_memory(nbytes):
    """Pinned host memory: a buffer object (``numpy.frombuffer`` takes it)."""
    size = _round(nbytes)
    raw = _take(_pinned_free, size)
    if raw is None:
        raw = _np.empty(size, _np.uint8)
        _pinned.append(raw)
    owner = (ctypes.c_uint8 * len(raw)).from_buffer(raw)
    weakref.finalize(owner, _pinned_free.append, raw)
    return owner


def _pinned_view(a):
    """A plain view of host array ``a`` through its pinned block, or None if it is pageable."""
    address = a.ctypes.data
    for raw in _pinned:
        start = raw.ctypes.data
        if start <= address < start + len(raw):
            return _np.ndarray(a.shape, a.dtype, buffer=raw, offset=address - start,
                               strides=a.strides)
    return None


def _poison(a):
    """All-ones bits in ``a`` (a plain array): NaN for floats, -1 for integers."""
    a[...] = _np.full(a.dtype.itemsize, 0xFF, _np.uint8).view(a.dtype)[0]


# -- arrays ------------------------------------------------------------------------------
def _plain(x):
    return _np.ndarray.view(x, _np.ndarray)


class ndarray(_np.ndarray):
    """A "device" array: numpy memory from the stand-in pool, CuPy's transfer methods."""

    _block = None

    def __array_finalize__(self, obj):
        block = getattr(obj, "_block", None)
        self._block = block if block is not None and block.contains(self.ctypes.data) else None

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _kernel(lambda *a, **k: _ufunc(ufunc, method, *a, **k), inputs, kwargs,
                       ufunc.__name__)

    def __array_function__(self, func, types, args, kwargs):
        written = (args[0],) if func is _np.copyto else ()
        return _kernel(func, args, kwargs, func.__name__, written)

    def __getitem__(self, key):
        if _is_basic(key):
            return super().__getitem__(key)              # a view: no kernel
        return _kernel(lambda a, k: a[k], (self, key), {}, "getitem", host_ok=True)

    def __setitem__(self, key, value):
        if isinstance(value, _np.ndarray) and not isinstance(value, ndarray) and value.ndim:
            raise TypeError("stand-in: setitem given a host numpy array as the value; copy "
                            "it to the device first (CuPy raises here too)")

        def store(a, k, v):
            a[k] = v
        _kernel(store, (self, key, value), {}, "setitem", (self,), host_ok=True)

    def astype(self, dtype, copy=True, **kwargs):
        if not copy and _np.dtype(dtype) == self.dtype:
            return self
        return _kernel(lambda a: a.astype(dtype, **kwargs), (self,), {}, "astype")

    def copy(self, order="C"):
        return _kernel(lambda a: a.copy(order), (self,), {}, "copy")

    def get(self, stream=None, out=None, blocking=True):
        """Device -> host on ``stream`` (the current one by default)."""
        stream = stream or _current
        seq = _issue(stream)
        _check([self], stream, "device-to-host copy")
        if out is None:
            out = _np.empty(self.shape, self.dtype)
        pinned = _pinned_view(out)
        copy = _Copy(seq, _raw_view(self) if self._block is not None else _plain(self),
                     pinned if pinned is not None else out, to_host=True)
        stream.queue.append(copy)
        if pinned is None:           # into pageable memory CUDA copies synchronously
            blocking = True
        else:
            _poison(pinned)
        if blocking:
            stream.synchronize()
        return out

    def set(self, arr, stream=None):
        """Host -> device on ``stream`` (the current one by default)."""
        stream = stream or _current
        seq = _issue(stream)
        _check([self], stream, "host-to-device copy")
        arr = _np.asarray(arr)
        pinned = _pinned_view(arr) if isinstance(arr, _np.ndarray) else None
        # from pageable memory the source is staged at once; from pinned memory it is read
        # when the device gets to the copy
        src = pinned if pinned is not None else _np.array(arr, dtype=self.dtype, copy=True)
        dst = _raw_view(self) if self._block is not None else _plain(self)
        _poison(dst)
        stream.queue.append(_Copy(seq, src, dst, to_host=False))
        if self._block is not None:
            self._block.writer = (stream, seq)

    def tolist(self):
        return asnumpy(self).tolist()

    def item(self, *args):
        return asnumpy(self).item(*args)

    def __float__(self):
        return float(asnumpy(self))

    def __int__(self):
        return int(asnumpy(self))

    def __bool__(self):
        return bool(asnumpy(self))

    def __repr__(self):
        # the memory as it is now, with no copy: a repr must not raise StreamOrderError
        return "stand-in " + repr(_plain(self))


def _is_basic(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return all(k is None or k is Ellipsis or isinstance(k, (int, _np.integer, slice))
               for k in keys)


def _ufunc(ufunc, method, *inputs, **kwargs):
    if ufunc is _np.matmul and method == "__call__" and any(
            getattr(x, "dtype", None) == _BF16 for x in inputs):
        # cuBLAS GemmEx on BF16: float32 accumulation, BF16 result
        a, b = (x.astype(_np.float32) for x in inputs)
        out = kwargs.pop("out", None)
        result = _np.matmul(a, b, **kwargs).astype(_BF16)
        if out is not None:
            out[0][...] = result
            return out[0]
        return result
    return getattr(ufunc, method)(*inputs, **kwargs)


def _walk(x, fn):
    if isinstance(x, (list, tuple)):
        return type(x)(_walk(v, fn) for v in x)
    return fn(x)


def _kernel(func, args, kwargs, name, written=(), host_ok=False):
    """Run ``func`` as a kernel on the current stream: after the stream's earlier work, on
    device memory only, each result in a block of the stream's pool."""
    stream = _current
    seq = _issue(stream)
    outs = kwargs.get("out")
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else ((outs,) if outs is not None else ())
    written = tuple(written) + outs
    devices = []

    def unwrap(x):
        if isinstance(x, ndarray):
            devices.append(x)
            return _plain(x)
        if isinstance(x, _np.ndarray) and x.ndim and not host_ok:
            raise TypeError(f"stand-in: {name} given a host numpy array; device kernels take "
                            "device arrays (CuPy raises here too)")
        return x

    plain_args = _walk(args, unwrap)
    plain_kwargs = {k: _walk(v, unwrap) for k, v in kwargs.items()}
    _check(devices, stream, f"kernel {name}")
    result = func(*plain_args, **plain_kwargs)
    for w in written:
        if isinstance(w, ndarray) and w._block is not None:
            w._block.writer = (stream, seq)
    if outs:
        return outs[0] if len(outs) == 1 else outs
    return _walk(result, lambda r: _to_device(r, stream, seq) if isinstance(r, _np.ndarray) else r)


def _to_device(result, stream, seq):
    out = _device_empty(result.shape, result.dtype, stream)
    _plain(out)[...] = result
    out._block.writer = (stream, stream.seq)
    return out


# -- the cupy namespace ------------------------------------------------------------------
def empty(shape, dtype=_np.float64, order="C"):
    return _device_empty(shape, dtype)


def empty_like(a, dtype=None):
    return _device_empty(a.shape, dtype or a.dtype)


def _filled(shape, dtype, value):
    out = _device_empty(shape, dtype)
    _kernel(lambda o: o.fill(value), (out,), {}, "fill", (out,))
    return out


def zeros(shape, dtype=_np.float64):
    return _filled(shape, dtype, 0)


def ones(shape, dtype=_np.float64):
    return _filled(shape, dtype, 1)


def zeros_like(a, dtype=None):
    return zeros(a.shape, dtype or a.dtype)


def full(shape, value, dtype=None):
    return _filled(shape, dtype or _np.asarray(value).dtype, value)


def asarray(a, dtype=None):
    """Host -> device on the current stream (a device array stays as it is)."""
    if isinstance(a, ndarray):
        return a if dtype is None or _np.dtype(dtype) == a.dtype else a.astype(dtype)
    host = _np.asarray(a, dtype=dtype)
    out = _device_empty(host.shape, host.dtype)
    out.set(host)
    return out


array = asarray


def asnumpy(a, stream=None, out=None, blocking=True):
    if not isinstance(a, ndarray):
        return _np.asarray(a)
    return a.get(stream=stream, out=out, blocking=blocking)


class ElementwiseKernel:
    """CuPy's ElementwiseKernel; the stand-in runs ``twin``, a numpy function that computes
    what the CUDA ``operation`` does: ``twin(*inputs, *outputs)`` on plain arrays."""

    def __init__(self, in_params, out_params, operation, name="kernel", twin=None, **kwargs):
        if twin is None:
            raise TypeError(f"stand-in ElementwiseKernel {name}: no numpy twin given")
        self.name, self.twin = name, twin
        self.num_out = len([p for p in out_params.split(",") if p.strip()])

    def __call__(self, *args):
        outs = args[-self.num_out:]
        _kernel(self.twin, args, {}, self.name, outs)
        return outs[0] if self.num_out == 1 else outs


def __getattr__(name):
    """Everything else (exp, argsort, einsum, float32, ...) as numpy kernels on "device"."""
    attr = getattr(_np, name)
    if callable(attr) and not isinstance(attr, type):
        def call(*args, **kwargs):
            written = (args[0],) if attr is _np.copyto else ()
            return _kernel(attr, args, kwargs, name, written)
        call.__name__ = name
        return call
    return attr


class _Event:
    _rng = random.Random(os.getpid())

    def __init__(self, *args, **kwargs):
        self._polls, self._busy = 0, 0
        self.stream, self.mark, self.after = None, 0, {}

    def record(self, stream=None):
        self.stream = stream or _current
        self.mark = self.stream.seq                # covers the work issued so far
        self.after = {**self.stream.after, self.stream: self.mark}
        self._polls, self._busy = 0, self._rng.randint(1, 3)

    @property
    def done(self) -> bool:
        if self.stream is None:
            return True
        self._polls += 1
        if self._polls <= self._busy:              # "still running" for a while
            return False
        _observe(self.after)
        return True

    def synchronize(self):
        if self.stream is not None:
            _observe(self.after)


class _Device:
    def __init__(self, index=0):
        self.id = index

    def use(self):
        cuda.current = self.id


class _Runtime:
    @staticmethod
    def getDeviceCount() -> int:
        return int(os.environ.get("MOEMPI_STANDIN_GPUS", "1"))

    @staticmethod
    def getDeviceProperties(index):
        return {"name": b"numpy stand-in", "totalGlobalMem": 16 << 30}


class _Cuda:
    Stream = _Stream
    Event = _Event
    Device = _Device
    runtime = _Runtime()
    current = 0
    alloc_pinned_memory = staticmethod(alloc_pinned_memory)
    get_current_stream = staticmethod(get_current_stream)


cuda = _Cuda()
