"""Weights that onnxruntime has packed, moved onto 2 MiB pages after a session is built.

Why: a quantized decode step streams every packed weight once (205 MB for the 360M shape at int4)
through ``MatMulNBits``, which reads several rows of blocks, their scales and sums at once. With
4 KiB pages that is a page walk every few KB per stream, and the CPU's prefetchers stop at each
4 KiB boundary. onnxruntime allocates its packed weights with plain ``malloc``, and where
transparent huge pages are ``madvise`` only (the common default) they stay on 4 KiB pages.
``MADV_COLLAPSE`` (Linux 6.1+) copies already-resident memory onto huge pages in place, whatever the
system-wide setting, without marking the region for huge pages later (so later faults in it, e.g. a
KV cache filling or the heap growing, still take small pages).

Only 2 MiB ranges whose every page is resident are collapsed (``mincore``), so the process's resident
memory does not grow: a partly used arena chunk, a lazily zeroed array or a heap's free tail stay as
they are. Measured on the 360M shape at int4 (2 threads, 2 cores): decode ~7-10 % faster; fp32, whose
``MatMul`` streams one panel at a time, unchanged (docs/inference.md).

Best effort: on another OS, an older kernel or with THP disabled (``never``) nothing happens. This
module only advises the kernel; it knows nothing of onnxruntime or models.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys

log = logging.getLogger(__name__)

HUGE = 2 << 20
MADV_COLLAPSE = 25
#: regions smaller than this are not worth a scan (thread stacks, small mallocs)
MIN_REGION = 4 << 20


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        return libc
    except (OSError, AttributeError):
        return None


def anonymous_regions(smaps: str) -> list[tuple[int, int]]:
    """``(start, end)`` of the writable private anonymous mappings (the heap included) of at least
    :data:`MIN_REGION` bytes in a ``/proc/<pid>/smaps`` (or ``maps``) text."""
    out = []
    for line in smaps.splitlines():
        fields = line.split()
        if len(fields) < 5 or "-" not in fields[0] or fields[0].endswith(":"):
            continue
        name = fields[5] if len(fields) > 5 else ""
        if name not in ("", "[heap]") or not fields[1].startswith("rw") or fields[1][3] != "p":
            continue
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if hi - lo >= MIN_REGION:
            out.append((lo, hi))
    return out


def resident_huge_ranges(lo: int, hi: int, resident: bytes) -> list[tuple[int, int]]:
    """The 2 MiB-aligned ranges inside ``[lo, hi)`` whose pages are all resident, merged where they
    touch; ``resident[i]`` is ``mincore``'s byte for the i-th page from ``lo`` (bit 0 set: resident)."""
    page = mmap.PAGESIZE
    per = HUGE // page
    out: list[tuple[int, int]] = []
    start = (lo + HUGE - 1) // HUGE * HUGE
    for a in range(start, hi - HUGE + 1, HUGE):
        first = (a - lo) // page
        if all(b & 1 for b in resident[first:first + per]):
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], a + HUGE)
            else:
                out.append((a, a + HUGE))
    return out


def collapse_resident_memory() -> int:
    """Moves this process's fully resident anonymous memory onto huge pages; returns the bytes moved."""
    libc = _libc()
    if libc is None:
        return 0
    try:
        with open("/proc/self/maps") as f:
            regions = anonymous_regions(f.read())
    except OSError:
        return 0
    page = mmap.PAGESIZE
    moved = 0
    for lo, hi in regions:
        n = (hi - lo) // page
        vec = (ctypes.c_ubyte * n)()
        if libc.mincore(ctypes.c_void_p(lo), hi - lo, vec) != 0:
            continue  # unmapped meanwhile, or not supported
        for a, b in resident_huge_ranges(lo, hi, bytes(vec)):
            if libc.madvise(ctypes.c_void_p(a), b - a, MADV_COLLAPSE) == 0:
                moved += b - a
            elif ctypes.get_errno() == 22:  # EINVAL: no MADV_COLLAPSE (kernel < 6.1) or THP "never"
                return moved
    log.debug("moved %.1f MB of resident memory onto huge pages", moved / 1e6)
    return moved
