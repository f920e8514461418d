"""A numpy stand-in for the part of CuPy moempi uses, so GPU code paths run in CPU-only CI.

Arrays are a numpy subclass (so "device" and host arrays stay distinguishable and every
host<->device transfer must be explicit), streams and events keep CuPy's interface, and
an event reports "not ready" for a random number of queries (1 to 3, a different sequence
in every process), so the scheduler's polling of GPU work, and work finishing in a
different order on different ranks, are exercised too.  Nothing here is fast; it is there
to be correct.

It also checks CuPy's stream rule for memory (CuPy's pool hands a freed block to the next
allocation *on the stream that allocated it*, while kernels queued earlier on that stream
may still use it): a copy on stream S into or out of an array allocated on another stream
T must come after S waited for an event recorded on T since the allocation.  A copy that
does not raises :class:`StreamOrderError`; on a GPU it would race with T's queued kernels.
"""

from __future__ import annotations

import os
import random

import numpy as _np

__version__ = "stand-in (numpy " + _np.__version__ + ")"


class StreamOrderError(RuntimeError):
    """A copy on one stream touched memory allocated on another without waiting for it."""


class ndarray(_np.ndarray):
    """A "device" array: numpy memory, CuPy's transfer methods, the stream it came from."""

    def __array_finalize__(self, obj):
        base = self.base
        if isinstance(obj, ndarray) and base is not None and (base is obj or base is obj.base):
            self._stream, self._epoch = obj._stream, obj._epoch       # a view: obj's memory
        else:
            stream = _Stream.current
            self._stream, self._epoch = stream, stream.epoch         # new memory, from stream

    def _check(self, stream, what):
        stream = stream or _Stream.current
        owner = getattr(self, "_stream", stream)
        if owner is not stream and stream.waited.get(owner, -1) <= self._epoch:
            raise StreamOrderError(f"stand-in: {what} on another stream than the one that "
                                   "allocated the array, without waiting for that stream's "
                                   "work since the allocation")

    def get(self, stream=None, out=None, blocking=True):
        self._check(stream, "device-to-host copy")
        return asnumpy(self, out=out)

    def set(self, arr, stream=None):
        self._check(stream, "host-to-device copy")
        self[...] = arr


def _wrap(value):
    if isinstance(value, _np.ndarray) and not isinstance(value, ndarray):
        return value.view(ndarray)
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    return value


def asarray(a, dtype=None):
    return _np.array(a, dtype=dtype, copy=True).view(ndarray)


def asnumpy(a, stream=None, out=None):
    host = _np.asarray(a).view(_np.ndarray)
    if out is None:
        return host.copy()
    out[...] = host
    return out


def __getattr__(name):
    """Everything else (zeros, exp, argsort, einsum, float32, ...) as numpy, on "device"."""
    attr = getattr(_np, name)
    if callable(attr) and not isinstance(attr, type):
        def call(*args, **kwargs):
            return _wrap(attr(*args, **kwargs))
        call.__name__ = name
        return call
    return attr


class _Stream:
    current: "_Stream"

    def __init__(self, non_blocking=False):
        self.non_blocking = non_blocking
        self.epoch = 0               # events recorded so far
        self.waited = {}             # stream -> the latest epoch of it this stream waited for
        self._outer = []

    def __enter__(self):
        self._outer.append(_Stream.current)
        _Stream.current = self
        return self

    def __exit__(self, *exc):
        _Stream.current = self._outer.pop()
        return False

    def synchronize(self):
        pass

    def use(self):
        _Stream.current = self
        return self

    def wait_event(self, event):
        if event.stream is not None:
            self.waited[event.stream] = max(self.waited.get(event.stream, -1), event.epoch)

    def record(self, event=None):
        event = event or _Event()
        event.record(self)
        return event


_Stream.current = _Stream()          # the null stream


class _Event:
    _rng = random.Random(os.getpid())

    def __init__(self, *args, **kwargs):
        self._polls, self._busy = 0, 0
        self.stream, self.epoch = None, -1

    def record(self, stream=None):
        self.stream = stream or _Stream.current
        self.stream.epoch += 1
        self.epoch = self.stream.epoch
        self._polls, self._busy = 0, self._rng.randint(1, 3)

    @property
    def done(self) -> bool:
        self._polls += 1
        return self._polls > self._busy    # "still running" for a while, like real GPU work

    def synchronize(self):
        self._polls = self._busy


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

    @staticmethod
    def alloc_pinned_memory(nbytes):
        return bytearray(max(int(nbytes), 1))


cuda = _Cuda()
