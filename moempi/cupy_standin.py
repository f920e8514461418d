"""A numpy stand-in for the part of CuPy moempi uses, so GPU code paths run in CPU-only CI.

Arrays are a numpy subclass (so "device" and host arrays stay distinguishable and every
host<->device transfer must be explicit), streams and events keep CuPy's interface, and
an event reports "not ready" for a random number of queries (1 to 3, a different sequence
in every process), so the scheduler's polling of GPU work, and work finishing in a
different order on different ranks, are exercised too.  Nothing here is fast; it is there
to be correct.
"""

from __future__ import annotations

import os
import random

import numpy as _np

__version__ = "stand-in (numpy " + _np.__version__ + ")"


class ndarray(_np.ndarray):
    """A "device" array: numpy memory, CuPy's transfer methods."""

    def get(self, stream=None, out=None, blocking=True):
        host = _np.asarray(self).view(_np.ndarray)
        if out is None:
            return host.copy()
        out[...] = host
        return out

    def set(self, arr, stream=None):
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
    def __init__(self, non_blocking=False):
        self.non_blocking = non_blocking

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass

    def use(self):
        return self

    def wait_event(self, event):
        pass

    def record(self, event=None):
        event = event or _Event()
        event.record(self)
        return event


class _Event:
    _rng = random.Random(os.getpid())

    def __init__(self, *args, **kwargs):
        self._polls, self._busy = 0, 0

    def record(self, stream=None):
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
        _cuda.current = self.id


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
_cuda = cuda
