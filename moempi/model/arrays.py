"""Array-module helpers that need no GPU: which module an array belongs to, BF16 bits on any module."""

from __future__ import annotations

import sys

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


def array_module(x):
    """The array module an array belongs to (numpy, cupy or the stand-in), without importing cupy."""
    module = type(x).__module__
    top = module.split(".")[0]
    if top == "numpy" or np.isscalar(x):
        return np
    # CuPy's arrays live in cupy._core.core; the stand-in's in its own module
    return sys.modules["cupy" if top == "cupy" else module]


# -- BF16 on the wire: uint16 bit patterns, round to nearest even -------------------------
def encode_bf16(xp, x, out) -> None:
    """float32 ``x`` -> BF16 bits in ``out`` (uint16), on any array module; NaN stays NaN
    (as ml_dtypes rounds), so a poisoned value cannot turn into a number on the wire."""
    u = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    out[...] = xp.where(nan, (u >> 16) | 0x40, rounded).astype(xp.uint16)


def decode_bf16(xp, bits, out) -> None:
    """BF16 bits (uint16) -> float32 ``out``, exactly."""
    out.view(xp.uint32)[...] = bits.astype(xp.uint32) << 16
