"""Resident memory of memory-mapped weights: give back the pages of a checkpoint once read.

`inference.load_model` maps the checkpoint (`torch.load(mmap=True)`, a private file mapping)
and makes the parameters views of it. Every page a pass touches then counts in the process's
resident size (RssFile) until the kernel reclaims it: at release scale the whole 1.7 GB
checkpoint is touched once (the finiteness check, the sparse copies of the linears), although
the weights are ~99.9% zeros and the fast forward only reads their compressed copies.

`release_mapped_pages(tensors)` tells the kernel (madvise MADV_DONTNEED) that the process no
longer needs the mapped pages behind those tensors. For a private *file* mapping none of whose
pages was written by the process (no copy-on-write copies: `Anonymous: 0 kB` in /proc/self/smaps;
Private_Dirty would also count a freshly written file's pages) that loses nothing: a later read faults
the same bytes back in from the page cache (or the file). Mappings with written pages (a weight
edited in place), anonymous memory and non-Linux systems are left alone, so the call is always
safe; it only lowers RSS, never changes a value.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import sys
import threading

import torch

_MADV_DONTNEED = 4
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def _file_mappings() -> list[tuple[int, int, str, int]]:
    """(start, end, path, Anonymous kB) of every file-backed mapping of this process."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line: "start-end perms offset dev inode path"
                parts = line.split(None, 5)
                path = parts[5].strip() if len(parts) > 5 else ""
                a, b = head.split("-")
                cur = [int(a, 16), int(b, 16), path, 0] if path.startswith("/") else None
                if cur is not None:
                    out.append(cur)
            elif cur is not None and head == "Anonymous:":  # copy-on-write copies of written pages
                cur[3] += int(line.split()[1])
    return [tuple(m) for m in out]


def release_mapped_pages(tensors, whole_mappings: bool = True) -> int:
    """Drop from this process's resident set the pages of the clean private file mappings that
    hold any of `tensors` (e.g. `model.parameters()`): the whole mappings, or with
    `whole_mappings=False` only the pages inside the tensors' own bytes. Returns the bytes
    released (0 off Linux or when none qualifies). Values are unchanged (module doc)."""
    if not sys.platform.startswith("linux"):
        return 0
    spans = sorted(
        {(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors
         if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() and t.is_contiguous()}
    )  # fmt: skip
    if not spans:
        return 0
    try:
        maps = _file_mappings()
    except OSError:
        return 0
    page = mmap.PAGESIZE
    released = 0
    for start, end, path, anon_kb in maps:
        if anon_kb or not os.path.isfile(path):
            continue  # written pages (copy-on-write) would be lost: keep the mapping as is
        inside = [(a, b) for a, b in spans if start <= a < end]
        if not inside:
            continue
        for a, b in [(start, end)] if whole_mappings else inside:
            a, b = (a + page - 1) // page * page, min(b, end) // page * page  # whole pages only
            if b > a and _madvise()(a, b - a, _MADV_DONTNEED) == 0:
                released += b - a
    return released


_trim = []


def trim_heap() -> bool:
    """Give the C heap's free memory back to the system (glibc `malloc_trim(0)`, every arena).

    A forward pass allocates and frees many intermediates of a few MB on several threads; glibc
    keeps freed memory in its per-thread arenas, and after a large block is freed it raises its
    mmap threshold, so later blocks of that size come from the arenas too. Chunk after chunk the
    resident size then creeps up although nothing is held (measured at release scale: +0.8 GB
    over a few minutes of 2-doc chunks). Returns False where there is no glibc."""
    if not _trim:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
                fn.argtypes, fn.restype = (ctypes.c_size_t,), ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _trim.append(fn)
    if _trim[0] is None:
        return False
    _trim[0](0)
    return True


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_M_MMAP_MAX_DEFAULT = 65536
# After heap_kept: the thresholds glibc's dynamic adjustment reaches once a block of 32 MB (its
# ceiling) was mmapped and freed, which every release-scale pass does (mmap above, trim above twice).
_MMAP_THRESHOLD_AFTER, _TRIM_THRESHOLD_AFTER = 32 * 1024 * 1024, 64 * 1024 * 1024


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return fn


_KEPT_LOCK = threading.Lock()
_kept_depth = [0]  # heap_kept blocks open, over all threads


@contextlib.contextmanager
def heap_kept():
    """Within the block, freed C-heap memory stays with the process for the next allocation.

    glibc serves blocks above 32 MB (the most its dynamic mmap threshold rises to) with a fresh
    mmap, and unmaps them on free: every such tensor of a pass (an ablation pass at release scale
    has dozens of 50-75 MB ones per layer) then costs a page fault per 4 kB page, zeroed by the
    kernel, before it is written: a 51 MB copy took 21 ms instead of 6 into memory already
    mapped (bench/README.md). Here mmap is off (every block from the main heap) and the heap is not
    trimmed on free, so a pass reuses the pages the previous one freed. On exit mmap is back, and,
    since setting a threshold turns glibc's dynamic thresholds off for good, both are set to what
    they would have risen to (32 MB mmap, 64 MB trim; not the 128 kB defaults, under which every
    block above 128 kB would be mapped and faulted afresh); `trim_heap` then gives the free memory
    back. Only changes where memory comes from, never a value; a no-op off glibc. The settings are
    the process's: blocks entered on several threads at once (the ablation modes run side by side)
    set them on the first entry and restore them on the last exit."""
    fn = _mallopt()
    if fn is None:
        yield
        return
    with _KEPT_LOCK:
        _kept_depth[0] += 1
        if _kept_depth[0] == 1:
            fn(_M_MMAP_MAX, 0)
            fn(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        with _KEPT_LOCK:
            _kept_depth[0] -= 1
            if _kept_depth[0] == 0:
                fn(_M_MMAP_MAX, _M_MMAP_MAX_DEFAULT)
                fn(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_AFTER)
                fn(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_AFTER)
                trim_heap()
