"""Resident anonymous memory moved onto huge pages, and nothing that was not resident made so.

The pure parts (which mappings, which 2 MiB ranges) are checked on text and bytes; the effect on a
real mapping of this process is read back from ``/proc/self/smaps``. Like the rest of the suite (network
namespaces, /proc) these need Linux, and the huge-page test a kernel with ``MADV_COLLAPSE`` (6.1+) and
transparent huge pages not ``never``, as the CI machine has: where they are missing the tests fail, never skip.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from meshllm.runtime import residency
from meshllm.runtime.residency import (
    HUGE,
    anonymous_regions,
    collapse_resident_memory,
    file_mappings,
    page_out,
    release_file_pages,
    resident_huge_ranges,
)

PAGE = mmap.PAGESIZE
PER = HUGE // PAGE


def _linux() -> None:
    assert sys.platform.startswith("linux"), "madvise and /proc/self/smaps: Linux only, like the nodes and this suite"

SMAPS = """\
55d0c0000000-55d0c8000000 rw-p 00000000 00:00 0                          [heap]
Rss:               40000 kB
7f0000000000-7f0001000000 rw-p 00000000 00:00 0
Rss:                1024 kB
7f0001000000-7f0001100000 rw-p 00000000 00:00 0
7f0002000000-7f0003000000 r--p 00000000 00:00 0
7f0003000000-7f0004000000 rw-s 00000000 00:05 12                         /dev/zero (deleted)
7f0004000000-7f0005000000 rw-p 00000000 08:01 99                         /models/layer.onnx.data
7f0005000000-7f0006000000 rw-p 00000000 00:00 0                          [stack]
"""


def test_regions_are_the_private_writable_anonymous_ones_and_the_heap():
    assert anonymous_regions(SMAPS) == [(0x55D0C0000000, 0x55D0C8000000), (0x7F0000000000, 0x7F0001000000)]


def test_only_fully_resident_aligned_huge_ranges_are_collapsed():
    lo = 5 * HUGE - 3 * PAGE  # starts 3 pages before an aligned boundary
    hi = lo + 3 * PAGE + 4 * HUGE
    resident = bytearray(b"\x01" * ((hi - lo) // PAGE))
    resident[3 + PER + 7] = 0  # one page missing in the second huge range
    assert resident_huge_ranges(lo, hi, bytes(resident)) == [(5 * HUGE, 6 * HUGE), (7 * HUGE, 9 * HUGE)]
    assert resident_huge_ranges(lo, lo + HUGE, b"\x01" * PER) == []  # no aligned 2 MiB range inside


@given(st.lists(st.booleans(), min_size=PER, max_size=6 * PER), st.integers(0, PER - 1))
def test_every_collapsed_range_is_aligned_inside_and_resident(pages, shift):
    lo = 10 * HUGE + shift * PAGE
    hi = lo + len(pages) * PAGE
    resident = bytes(int(p) for p in pages)
    ranges = resident_huge_ranges(lo, hi, resident)
    for a, b in ranges:
        assert a % HUGE == 0 and b % HUGE == 0 and lo <= a < b <= hi
        assert all(resident[(a - lo) // PAGE:(b - lo) // PAGE])
    covered = {a for r in ranges for a in range(r[0], r[1], HUGE)}
    for a in range((lo + HUGE - 1) // HUGE * HUGE, hi - HUGE + 1, HUGE):  # and every resident one is there
        assert (a in covered) == all(resident[(a - lo) // PAGE:(a - lo) // PAGE + PER])


def _huge_kib(addr: int) -> int:
    """AnonHugePages (KiB) of the mapping holding ``addr``."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                inside = lo <= addr < hi
            elif inside and fields[0] == "AnonHugePages:":
                return int(fields[1])
    return 0


def _resident_pages(buf: mmap.mmap) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    n = len(buf) // PAGE
    vec = (ctypes.c_ubyte * n)()
    assert libc.mincore(ctypes.c_void_p(np.frombuffer(buf, np.uint8).ctypes.data), len(buf), vec) == 0
    return sum(b & 1 for b in vec)


def test_a_touched_mapping_moves_onto_huge_pages_and_an_untouched_one_stays_out():
    _linux()
    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # as malloc maps (Python's default is shared)
    touched = mmap.mmap(-1, 16 * HUGE, flags=private)  # unmapped when collected (numpy views keep them open)
    untouched = mmap.mmap(-1, 16 * HUGE, flags=private)
    a = np.frombuffer(touched, np.uint8)
    a[::PAGE] = 7  # every page resident
    np.frombuffer(untouched, np.uint8)[:HUGE:PAGE] = 1  # the first 2 MiB only
    assert _resident_pages(untouched) == PER
    moved = collapse_resident_memory()
    huge = _huge_kib(a.ctypes.data)
    assert moved and huge, "no MADV_COLLAPSE here (kernel < 6.1 or transparent huge pages off)"
    assert huge >= 15 * HUGE // 1024  # the aligned interior: all but at most one range at the ends
    assert int(a.sum()) == 7 * (16 * HUGE // PAGE)  # contents kept
    assert _resident_pages(untouched) == PER  # nothing made resident that was not
    assert _resident_pages(touched) == 16 * HUGE // PAGE


def test_does_nothing_where_the_platform_cannot(monkeypatch):
    monkeypatch.setattr(residency, "_libc", lambda: None)
    assert collapse_resident_memory() == 0


# --- model file pages -------------------------------------------------------------------------------

FILE_SMAPS = """\
7f1000000000-7f1000010000 rw-p 00001000 08:01 77                         /m/layer_000.onnx.data
Rss:                  64 kB
Anonymous:             0 kB
7f1000010000-7f1000020000 rw-p 00002000 08:01 77                         /m/layer_000.onnx.data
Rss:                  64 kB
Anonymous:             4 kB
7f1000020000-7f1000030000 r--p 00000000 08:01 78                         /m/other file.onnx.data
Rss:                   8 kB
Anonymous:             0 kB
7f1000030000-7f1000040000 r--p 00000000 08:01 79                         /m/layer_001.onnx.data
Rss:                   8 kB
Anonymous:             0 kB
"""


def test_file_mappings_are_those_of_the_files_with_no_private_page():
    assert file_mappings(FILE_SMAPS, ["/m/layer_000.onnx.data", "/m/other file.onnx.data"]) == [
        (0x7F1000000000, 0x7F1000010000), (0x7F1000020000, 0x7F1000030000)]


def _mapped_kib(prefix: str) -> int:
    """Resident KiB of this process's mappings of files whose path starts with ``prefix`` (``mincore``
    would tell the page cache's residency, not the process's)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 5 and "-" in fields[0] and not fields[0].endswith(":"):
                inside = len(fields) > 5 and fields[5].startswith(prefix)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_clean_file_pages_leave_the_process_and_read_back_the_same_and_written_ones_stay(tmp_path):
    _linux()
    data = np.arange(256 * PAGE // 4, dtype=np.uint32)
    (tmp_path / "a.onnx.data").write_bytes(data.tobytes())
    (tmp_path / "b.onnx.data").write_bytes(data.tobytes())
    # private writable mappings, as onnxruntime maps external initializers
    clean = np.memmap(tmp_path / "a.onnx.data", np.uint32, mode="c")
    written = np.memmap(tmp_path / "b.onnx.data", np.uint32, mode="c")
    assert int(clean.sum(dtype=np.uint64)) == int(data.sum(dtype=np.uint64))  # every page resident
    written[5] = 99  # one page copied on write: this mapping is no longer the file's
    int(written.sum(dtype=np.uint64))
    a, b = (os.path.realpath(tmp_path / n) for n in ("a.onnx.data", "b.onnx.data"))
    assert _mapped_kib(a) == _mapped_kib(b) == 256 * PAGE // 1024
    released = release_file_pages([a, b])
    assert released >= 256 * PAGE
    assert _mapped_kib(a) == 0
    assert np.array_equal(clean, data)  # faulted back in from the file
    assert _mapped_kib(b) == 256 * PAGE // 1024 and written[5] == 99 and np.array_equal(written[6:], data[6:])


def test_a_stale_range_that_became_heap_memory_keeps_what_it_holds():
    """The mappings are read from smaps, then advised: between the two another thread may unmap one
    (onnxruntime freeing a session) and the heap take its addresses. The advice must not change what
    the memory there holds (``MADV_DONTNEED`` zeroed it: a double free in tools/sim_to_real.py)."""
    _linux()
    # private anonymous memory, as the heap's (a shared mapping keeps its pages in shmem whatever the advice)
    heap = mmap.mmap(-1, 64 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    held = np.frombuffer(heap, np.uint8)
    held[:] = np.arange(held.size) % 251
    lo = ctypes.addressof(ctypes.c_char.from_buffer(heap))
    assert page_out([(lo, lo + 64 * PAGE)]) == 64 * PAGE
    assert np.array_equal(held, np.arange(held.size) % 251)


def test_pages_of_a_file_just_written_leave_too(tmp_path):
    """A model exported a moment ago has dirty pages, which the kernel cannot page out unsynced."""
    _linux()
    path = tmp_path / "fresh.onnx.data"
    data = np.arange(64 * PAGE // 4, dtype=np.uint32)
    path.write_bytes(data.tobytes())
    mapped = np.memmap(path, np.uint32, mode="c")
    assert np.array_equal(mapped, data)
    assert _mapped_kib(os.path.realpath(path)) == 64 * PAGE // 1024
    release_file_pages([path])
    assert _mapped_kib(os.path.realpath(path)) == 0
    assert np.array_equal(mapped, data)


def test_a_quantized_segment_holds_no_page_of_its_model_files_and_decodes_the_same(tmp_path, monkeypatch):
    from meshllm.runtime.segment import Segment
    from tests.serving_harness import random_exports

    model = random_exports(tmp_path, ("int4",), layers=2, seed=3) / "int4"

    def mapped_kib() -> int:
        return _mapped_kib(os.path.realpath(model) + "/")

    def steps(seg: Segment) -> list[np.ndarray]:
        seg.open(0)
        out = [seg.prefill(0, np.arange(3, 40))]
        out += [seg.decode([0], np.array([7 + i])) for i in range(4)]
        return out

    released = Segment(model, max_seq_len=64, threads=1)
    assert mapped_kib() == 0
    got = steps(released)
    monkeypatch.setattr(residency, "release_file_pages", lambda paths: 0)
    kept = Segment(model, max_seq_len=64, threads=1)
    assert mapped_kib() > 0  # onnxruntime does keep them: the scales of every MatMulNBits
    for a, b in zip(got, steps(kept), strict=True):
        np.testing.assert_array_equal(a, b)


def test_only_quantized_segments_collapse_and_the_work_is_bounded(tmp_path, monkeypatch):
    from meshllm.runtime.segment import Segment
    from tests.serving_harness import random_exports

    root = random_exports(tmp_path, ("fp32", "int4"), layers=1, seed=4)
    calls: list[str] = []
    monkeypatch.setattr(residency, "collapse_resident_memory", lambda: calls.append("collapse") or 0)
    Segment(root / "fp32", max_seq_len=32, threads=1)
    assert calls == []  # float weights: no measured gain, and seconds of compaction for large models
    Segment(root / "int4", max_seq_len=32, threads=1)
    assert calls == ["collapse"]
    monkeypatch.undo()
    assert collapse_resident_memory(budget_s=0.0) == 0
