"""Keep glibc malloc from handing multi-MB tensors back to the OS after every step.

Each step allocates and frees the same few-MB temporaries (logits, sampling masks, attention
scores). Above glibc's default mmap threshold every one of them is mmapped and unmapped, and its
pages faulted in again: measured here, that doubled the sampler's time. Raising the mmap and trim
thresholds keeps them in the heap for reuse. Loading leaves far more behind (the dequantized
weights that prepacking or int4 replaced), so `release_freed_memory` returns that once, after it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling for 64-bit builds

log = logging.getLogger("parley.engine")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_freed_memory() -> bool:
    try:
        libc = _libc()
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, 2**30)
    except (OSError, AttributeError):  # not glibc
        return False
    if not ok:
        log.debug("mallopt refused the thresholds; keeping malloc defaults")
    return bool(ok)


def release_freed_memory() -> None:
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
