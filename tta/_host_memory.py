"""Host memory for CPU adaptation: glibc's malloc set to keep freed memory for reuse.

By default glibc returns large freed blocks to the kernel (``mmap`` above a dynamic
threshold, and trimming the heap's top), so every step page-faults the previous
step's activations back in, zeroing each 4 KiB page: on the shared ResNet-20 at
batch 200 (1 thread) a Tent step took ~170 000 minor faults and 635 ms, against
~700 and 530 ms with freed memory kept (plain inference 230 ms either way). This is
what the caching allocators of CUDA and of jemalloc/tcmalloc do; the cost is that
the process keeps its peak heap (its peak resident memory is unchanged).

Applied once per process, on the first step a method takes on the CPU or the first
corruption ``tta.corruptions`` renders there, on glibc only.
``TTA_HOST_ALLOCATOR=default`` in the environment leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["keep_freed_host_memory", "ENV_VAR"]

ENV_VAR = "TTA_HOST_ALLOCATOR"
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Blocks up to 1 GiB come from the heap (and are reused) rather than from fresh
# mmaps; the heap's top is never trimmed back to the kernel.
_MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = 2**31 - 1

_applied: bool | None = None


def keep_freed_host_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse (see the module docstring),
    once per process. Returns whether the setting is in effect: False off glibc,
    with ``TTA_HOST_ALLOCATOR=default``, or if ``mallopt`` refused it."""
    global _applied
    if _applied is None:
        _applied = False
        if os.environ.get(ENV_VAR, "keep").lower() != "default" and platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
                mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _applied
