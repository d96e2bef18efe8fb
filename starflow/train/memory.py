"""Host memory of a training process on a CPU: keep freed memory in the process instead of returning it.

PyTorch's CPU allocator takes every tensor from the C library's ``malloc``. glibc serves a block of 128 KiB or more
(a threshold it raises as blocks are freed, to at most 32 MiB) with a fresh ``mmap`` and gives it back on
``free``, and it trims the top of its heap once that much is free: the next step's activations then touch pages
the kernel must fault in and zero again. In ``benchmarks/train_step.py``'s default layout an untuned process
takes thousands to tens of thousands of such page faults per step, about 1.7 us each on a 2-core test machine.
:func:`retain_freed_memory` sets both thresholds (``mallopt``) so that blocks up to 1 GiB come from the heap and
freed memory is kept for reuse: after the first step a step takes no page faults. The resident set then stays
at its peak, which a training process reaches every step anyway. ``malloc_retain: 0`` keeps glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
RETAIN_BELOW = 1 << 30  # bytes: blocks smaller than this come from the heap
NEVER_TRIM = 2**31 - 1  # bytes (mallopt takes an int)


def retain_freed_memory() -> int:
    """Make glibc serve blocks below :data:`RETAIN_BELOW` from its heap and never trim it (``mallopt``).

    Process-wide and permanent (there is no switching back to glibc's adaptive thresholds).

    Returns:
        The mmap threshold now in force, in bytes: :data:`RETAIN_BELOW`, or 32 MiB on a glibc that refuses more;
        0 where the C library is not glibc (macOS, musl): nothing was changed.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return 0
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for threshold in (RETAIN_BELOW, 32 << 20):
        if mallopt(M_MMAP_THRESHOLD, threshold):
            mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
            return threshold
    return 0
