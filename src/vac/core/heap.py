"""glibc heap policy (``mallopt``) for the layer-streamed passes.

PyTorch's CPU allocator takes every tensor from ``malloc``; glibc serves blocks above its mmap
threshold with their own mapping, faulted in page by page and unmapped on ``free``, and raises that
threshold as large blocks are freed. :func:`bounded_heap` and :func:`trim_heap` keep a layer-streamed
pass's memory bounded by one layer while the layers change, without re-faulting the blocks a layer's
work reuses (:mod:`vac.core.stream`, docs/scale.md). Distillation keeps glibc's defaults: keeping every
block in the heap (``M_MMAP_MAX`` 0) made its steps up to 1.4x faster but its peak 1.6x the live
tensors (benchmarks/results/distill_heap.json). A maintained allocator (jemalloc, tcmalloc through
``LD_PRELOAD``) was considered: neither ships with Python wheels, and both must be chosen before the
process starts. No-ops off glibc.
"""

from __future__ import annotations

import functools


def bounded_heap() -> bool:
    """Fix glibc's mmap and trim thresholds (``mallopt``) so the heap stays bounded without
    re-faulting the blocks a layer's work reuses.

    By default glibc raises its mmap threshold each time a large block is freed, so the per-layer
    statistics and SVD workspaces of later layers come from a heap that never shrinks, and resident
    memory grows with the number of layers although nothing is kept (docs/scale.md). Fixed
    thresholds stop that drift: blocks of 32 MiB or more (glibc's largest mmap threshold; the
    statistics of wide layers, the calibration activations) get their own mapping and go back to the
    system when freed; smaller ones (activations of a refinement step, per-window hidden states) are
    reused from the heap instead of being mapped, faulted in and unmapped on every step, and up to
    256 MiB of free heap top is kept rather than trimmed and re-faulted; :func:`trim_heap` returns
    the rest after each layer. No-op off glibc."""
    libc = _libc()
    return bool(libc and libc.mallopt(-3, 32 << 20) and libc.mallopt(-1, 256 << 20))  # M_MMAP_, M_TRIM_THRESHOLD


def trim_heap() -> None:
    """Give the free pages inside the heap back to the system (glibc ``malloc_trim(0)``), once per
    layer: blocks reused within a layer's work stay mapped, what a finished layer freed does not
    stay resident. No-op off glibc."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None
