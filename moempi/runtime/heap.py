"""Keep freed memory in the process: no page faults for every large temporary array.

glibc's malloc serves a request of at least ``M_MMAP_THRESHOLD`` (128 KiB at start, raised
dynamically up to 32 MiB as mmapped blocks are freed) with its own ``mmap`` and gives it back
with ``munmap`` on free; freed memory at the top of the heap goes back to the kernel beyond
``M_TRIM_THRESHOLD`` (mallopt(3)).  Either way the next array of that size is paged in
again, one fault per 4 KiB page.  The forward pass makes such temporaries in every layer
(norm, gathers, GEMM outputs: ``[rows, H]``, ``[rows, F]`` float32), and on the VM this was
measured on a page fault costs about 2 us: 2 ranks at H 512, F 1024, 512 tokens per rank
took 12 000 faults and 140 ms per forward pass with the default thresholds, 0 faults and
115 ms with the ones below (37 000 and 185 ms with the trim threshold alone, which freezes
the mmap threshold at 128 KiB).

``keep_freed_memory`` sets the mmap threshold to glibc's largest (32 MiB on 64-bit) and a
trim threshold of 1 GiB: a process keeps what it freed (at most its own peak) and reuses
it.  Without glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1          # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: 4 MiB * sizeof(long)
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (above); True if both were accepted."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
