"""The exchange's local steps as one compiled pass each (numba), bit for bit the numpy steps of :mod:`moempi.model.arrays`.

Two steps touch every exchanged byte on the host: packing the send buffer (gather the
tokens' rows, rounded to BF16 on a BF16 wire) and summing the returned rows into the
tokens (widened from BF16, weighted).  numpy does each in several passes (round, then
gather; gather, widen, multiply, add per slot); here each is one loop over the rows.  (The
fp32 gather stays ``np.take``: one copy per row already, and faster than a loop.)

numba costs about 0.4 s to import and each kernel about 0.05 s to load from its cache (a
few seconds to compile the first time, cached beside this module or in
``NUMBA_CACHE_DIR``), so nothing here imports it until :func:`load` is called: the runtime
asks for the kernels only for a job whose exchanges are large enough to repay that.

The arithmetic is the numpy steps' own: BF16 rounding to nearest even by integer
operations (NaN kept a NaN: the device rule of :func:`moempi.model.arrays.encode_bf16`),
widening exactly, and the weighted sum as float32 products summed over the slots in
order, then added to the token, with no fused multiply-add (numba does not contract
without ``fastmath``); a dropped pair (position -1) reads row 0 at weight 0, as
``np.take(..., mode="clip")`` does.  Tests hold both paths to the same bits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

_kernels = None


@dataclass(frozen=True)
class Kernels:
    """The compiled local steps, and what loading them cost this process."""

    gather_round: object     # (src f32 [N, H] viewed uint32, idx [S] int64, out u16 [S, H])
    weighted_f32: object     # (x f32 [N, H], back f32 [S, H], pos [N, K] int64, w f32 [N, K])
    weighted_bf16: object    # (x, back u16 [S, H], pos, w)
    load_seconds: float      # importing numba, and loading (or compiling) the kernels

    def pack_bf16(self, rows_of: np.ndarray, idx: np.ndarray, out: np.ndarray) -> None:
        """``out`` (uint16 `[S, H]`) = BF16 bits of ``rows_of[idx]``, in one pass."""
        self.gather_round(np.ascontiguousarray(rows_of, np.float32).view(np.uint32),
                          np.ascontiguousarray(idx, np.int64), out)

    def weighted_sum(self, x: np.ndarray, back: np.ndarray, pos: np.ndarray,
                     w: np.ndarray) -> None:
        """``x[n] += sum_k w[n, k] * back[pos[n, k]]`` in one pass (``back`` float32 or BF16
        bits), bit for bit :func:`moempi.model.arrays.weighted_rows`."""
        if x.shape[0] == 0 or back.shape[0] == 0:
            return
        kernel = self.weighted_bf16 if back.dtype == np.uint16 else self.weighted_f32
        kernel(x, back, np.ascontiguousarray(pos, np.int64), np.ascontiguousarray(w, np.float32))


def load() -> Kernels:
    """Import numba and compile (or load from the cache) the kernels, once per process,
    calling each on a tiny input so that no compilation falls inside a timed layer."""
    global _kernels
    if _kernels is None:
        t = time.perf_counter()
        try:
            k = _build(cache=True)
        except RuntimeError:          # no writable cache location: compile in this process
            k = _build(cache=False)
        x = np.zeros((2, 4), np.float32)
        idx = np.zeros(2, np.int64)
        pos = np.zeros((2, 1), np.int64)
        w = np.zeros((2, 1), np.float32)
        k["gather_round"](x.view(np.uint32), idx, np.empty((2, 4), np.uint16))
        k["weighted_f32"](x, x, pos, w)
        k["weighted_bf16"](x, np.zeros((2, 4), np.uint16), pos, w)
        _kernels = Kernels(k["gather_round"], k["weighted_f32"], k["weighted_bf16"],
                           time.perf_counter() - t)
    return _kernels


def _build(cache: bool):
    import numba

    opts = dict(nogil=True, cache=cache, boundscheck=False)

    @numba.njit(**opts)
    def gather_round(bits, idx, out):
        """``out[i]`` = BF16 bits of ``src[idx[i]]``; ``bits`` is src `[N, H]` float32 viewed
        as uint32, out `[S, H]` uint16."""
        H = bits.shape[1]
        for i in range(idx.shape[0]):
            r = idx[i]
            for j in range(H):
                u = bits[r, j]
                if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                    out[i, j] = np.uint16((u >> np.uint32(16)) | np.uint32(0x40))
                else:
                    out[i, j] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) &
                                                                     np.uint32(1))) >> np.uint32(16))

    @numba.njit(**opts)
    def add_pair(acc, row, pos, w, n, k):
        """``acc (=|+=) w[n, k] * row`` (``=`` for the first slot), float32, no FMA; a
        dropped pair (-1) weighs 0, as numpy's ``take(mode="clip")`` on row 0 does."""
        wk = w[n, k] if pos[n, k] >= 0 else np.float32(0.0)
        if k == 0:
            for j in range(acc.shape[0]):
                acc[j] = row[j] * wk
        else:
            for j in range(acc.shape[0]):
                acc[j] = acc[j] + row[j] * wk

    @numba.njit(**opts)
    def weighted_f32(x, back, pos, w):
        """``x[n] += sum_k w[n, k] * back[pos[n, k]]``; back `[S, H]` float32."""
        acc = np.empty(x.shape[1], np.float32)
        for n in range(pos.shape[0]):
            for k in range(pos.shape[1]):
                add_pair(acc, back[max(pos[n, k], 0)], pos, w, n, k)
            x[n] += acc

    @numba.njit(**opts)
    def weighted_bf16(x, back, pos, w):
        """The same with ``back`` `[S, H]` BF16 bits (uint16), each row widened exactly."""
        acc = np.empty(x.shape[1], np.float32)
        row = np.empty(x.shape[1], np.float32)          # one returned row, widened (in L1)
        bits = row.view(np.uint32)
        for n in range(pos.shape[0]):
            for k in range(pos.shape[1]):
                src = back[max(pos[n, k], 0)]
                for j in range(bits.shape[0]):
                    bits[j] = np.uint32(src[j]) << np.uint32(16)
                add_pair(acc, row, pos, w, n, k)
            x[n] += acc

    return {"gather_round": gather_round,
            "weighted_f32": weighted_f32, "weighted_bf16": weighted_bf16}
