"""What a segment tells the kernel about its memory once its session is built.

Two things, both measured on the shapes of ``tools/bench_generate.py`` (docs/inference.md):

* :func:`collapse_resident_memory`: the packed weights onto 2 MiB pages, for speed;
* :func:`release_file_pages`: the pages of the model's files that onnxruntime keeps mapped but
  does not read again, out of the process, for memory.

Huge pages. Why: a quantized decode step streams every packed weight once (205 MB for the 360M shape at int4)
through ``MatMulNBits``, which reads several rows of blocks, their scales and sums at once. With
4 KiB pages that is a page walk every few KB per stream, and the CPU's prefetchers stop at each
4 KiB boundary. onnxruntime allocates its packed weights with plain ``malloc``, and where
transparent huge pages are ``madvise`` only (the common default) they stay on 4 KiB pages.
``MADV_COLLAPSE`` (Linux 6.1+) copies already-resident memory onto huge pages in place, whatever the
system-wide setting, without marking the region for huge pages later (so later faults in it, e.g. a
KV cache filling or the heap growing, still take small pages).

Quantized models only: a float32 model's ``MatMul`` streams one packed panel at a time and showed no
gain, while collapsing its 1.45 GB took 11 s of a 7 s load (360M shape, the kernel compacting memory
to find huge pages); the 197 MB of the 360M int4 model take 0.1 s. The work is also bounded in time.

Only 2 MiB ranges whose every page is resident are collapsed (``mincore``), so the process's resident
memory does not grow: a partly used arena chunk, a lazily zeroed array or a heap's free tail stay as
they are. Measured on the 360M shape at int4 (2 threads, 2 cores): decode ~7-10 % faster; fp32, whose
``MatMul`` streams one panel at a time, unchanged (docs/inference.md).

Files. onnxruntime maps each external initializer of the model files (``*.onnx.data``). Those it
prepacks (the weights) it unmaps; the ``MatMulNBits`` scales it keeps mapped, since on x86 the kernel
copies them into its packed buffer but does not report them packed (onnxruntime
``contrib_ops/cpu/quantization/matmul_nbits.cc``, ``PrePack``), and never reads them again: 7 MiB of
file pages in a 110M int4 process (3.5 % of it) resident for nothing. ``MADV_PAGEOUT`` (Linux 5.4+)
takes them out of the process (and out of the page cache where no other process maps them); a page
that is read after all faults back in from the file, unchanged. Only mappings without private
(copied-on-write) pages are advised, whose contents are exactly the file's, and the file is synced
first (a dirty page cannot be paged out; a model just exported has some). ``MADV_PAGEOUT``, not
``MADV_DONTNEED``: the mappings are read from ``/proc/self/smaps`` and another thread may unmap one
(onnxruntime freeing a session) and reuse its addresses for the heap before the advice lands;
``MADV_DONTNEED`` would then zero live memory (it crashed ``tools/sim_to_real.py`` with a double
free), ``MADV_PAGEOUT`` never changes what memory holds.

Best effort: on another OS, an older kernel or with THP disabled (``never``) nothing happens. This
module only advises the kernel; it knows nothing of onnxruntime or models.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import mmap
import os
import sys
import time
from collections.abc import Iterable

log = logging.getLogger(__name__)

HUGE = 2 << 20
MADV_COLLAPSE, MADV_PAGEOUT = 25, 21
#: regions smaller than this are not worth a scan (thread stacks, small mallocs)
MIN_REGION = 4 << 20


@functools.cache  # once per process: each segment load asks for it up to three times
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


def collapse_resident_memory(budget_s: float = 2.0) -> int:
    """Moves this process's fully resident anonymous memory onto huge pages, for at most ``budget_s``
    seconds (where memory is fragmented the kernel compacts it first); returns the bytes moved."""
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
    deadline = time.monotonic() + budget_s
    for lo, hi in regions:
        n = (hi - lo) // page
        vec = (ctypes.c_ubyte * n)()
        if libc.mincore(ctypes.c_void_p(lo), hi - lo, vec) != 0:
            continue  # unmapped meanwhile, or not supported
        for a, b in resident_huge_ranges(lo, hi, bytes(vec)):
            if time.monotonic() > deadline:
                log.debug("huge pages: out of time after %.1f MB", moved / 1e6)
                return moved
            if libc.madvise(ctypes.c_void_p(a), b - a, MADV_COLLAPSE) == 0:
                moved += b - a
            # else skipped: EINVAL where a region refuses huge pages (MADV_NOHUGEPAGE, as the KV caches)
            # or the kernel has no MADV_COLLAPSE (< 6.1), EAGAIN/ENOMEM where no huge page was found
    log.debug("moved %.1f MB of resident memory onto huge pages", moved / 1e6)
    return moved


def file_mappings(smaps: str, paths: Iterable[str]) -> list[tuple[int, int]]:
    """``(start, end)`` of the mappings of ``paths`` in a ``/proc/<pid>/smaps`` text that hold no
    private (copied-on-write) page: their contents are the file's."""
    wanted = set(paths)
    out: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for line in smaps.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) >= 5 and "-" in fields[0] and not fields[0].endswith(":"):
            name = line.split(None, 5)[5].strip() if len(fields) > 5 else ""
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            current = (lo, hi) if name in wanted else None
        elif current is not None and fields[0] == "Anonymous:":
            if int(fields[1]) == 0:
                out.append(current)
            current = None
    return out


def release_file_pages(paths: Iterable[str | os.PathLike[str]]) -> int:
    """Takes this process's resident pages of the files ``paths`` out of it (they fault back in from the
    file if read again); returns the bytes of the mappings advised."""
    libc = _libc()
    if libc is None:
        return 0
    real = [os.path.realpath(p) for p in paths]
    for path in real:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
    try:
        with open("/proc/self/smaps") as f:
            mappings = file_mappings(f.read(), real)
    except OSError:
        return 0
    released = page_out(mappings)
    log.debug("released %.1f MB of mapped model file pages", released / 1e6)
    return released


def page_out(ranges: Iterable[tuple[int, int]]) -> int:
    """Advises the kernel to reclaim the pages of ``ranges`` (``MADV_PAGEOUT``): what they hold is kept,
    whatever is mapped there by now; returns the bytes advised."""
    libc = _libc()
    if libc is None:
        return 0
    advised = 0
    for lo, hi in ranges:
        if libc.madvise(ctypes.c_void_p(lo), hi - lo, MADV_PAGEOUT) == 0:
            advised += hi - lo
    return advised
