"""Host memory of the pipeline: the output buffer pool and glibc's allocator settings."""
from __future__ import annotations

import math
import threading

import torch


class BlockBuffers:
    """Recycles the buffers of output blocks once the writer is done with them.

    A fresh block-sized buffer is mapped anew and zero-filled by the kernel on first touch, page
    by page (measured: ~10% of the CPU time of a merge). Buffers in use plus buffers kept never
    exceed ``keep``, the number of output blocks the memory model counts in flight; a block that
    fits no free buffer drops them all and gets a new one. Only buffers made here come back
    (``give`` ignores others, e.g. an input passed through unchanged by a copy).
    """

    def __init__(self, keep: int, pinned: bool = False):
        self.keep = keep
        self.pinned = pinned
        self._free: list[torch.Tensor] = []
        self._made: set[int] = set()
        self._in_use = 0
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = max(1, math.prod(shape)) * dtype.itemsize
        with self._lock:
            fitting = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fitting:
                buffer = self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))
            else:
                for b in self._free:
                    self._made.discard(b.data_ptr())
                self._free.clear()
                buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
                self._made.add(buffer.data_ptr())
            self._in_use += 1
        return buffer[:nbytes].view(dtype).view(shape)

    def give(self, block: torch.Tensor) -> None:
        if block.device.type != "cpu":
            return
        with self._lock:
            base = block.untyped_storage()
            if base.data_ptr() not in self._made:
                return
            self._in_use -= 1
            if self._in_use + len(self._free) < self.keep:
                self._free.append(torch.empty(0, dtype=torch.uint8).set_(base))
            else:
                self._made.discard(base.data_ptr())


def tune_allocator() -> None:
    """Pin glibc's malloc thresholds: blocks go back to the OS at once, tiles stay in the heap.

    By default glibc raises its mmap threshold after each large free (up to 32 MiB), after which
    block-sized buffers come from per-thread arenas that keep freed memory: with three pipeline
    threads that added ~300 MiB of RSS at --max-memory 512M. A fixed 4 MiB mmap threshold fixes
    that, but also pins the trim threshold at 128 KiB, so the heap is trimmed after every tile
    and each tile's temporaries page-fault in again (measured: 3.2M faults, 2x wall time); a
    32 MiB trim threshold keeps them. Process-wide, changes where memory comes from, never
    results. No-op off glibc.
    """
    global _allocator_limited
    if _allocator_limited:
        return
    _allocator_limited = True
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, 4 << 20)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD


def process_rss() -> int | None:
    """Resident bytes of this process now (VmRSS), or None where /proc is not available."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class HeapGuard:
    """Keeps the process under the resident size the memory model promised, by giving the free
    memory of glibc's arenas back to the OS (``malloc_trim``) when the process nears it.

    Tile temporaries (2 MiB, below the mmap threshold) and the writer's compressed chunks come
    from the arenas; freed, they stay resident as free chunks between live ones. At TIES's peak
    (the statistics passes and the kernel use temporaries of different sizes) that was ~100 MiB
    of free heap, more or less from run to run (--max-memory 128M: 430-545 MiB peak RSS; 512M on
    1 GB models: 890-1210 MiB against 795 predicted). Trimming after every block keeps the peak at
    the prediction but costs ~9 ms a call and the page faults of the temporaries touched again
    (+55% CPU on that merge), so the guard reads VmRSS after each kernel tile (~20 us) and trims
    only above ``ceiling``; a trim that frees little makes it wait longer before the next. Changes
    where memory comes from, never results. No-op off glibc or without /proc.
    """

    MIN_RELEASED = 8 << 20

    def __init__(self, ceiling: int | None):
        self.ceiling = ceiling
        self.trims = 0
        self._blocks = 0
        self._next = 0
        self._backoff = 1

    def after_block(self) -> None:
        """Called after each tile and block computed: trim the arenas if the process is above the
        ceiling (from one thread: the compute stage's)."""
        self._blocks += 1
        libc = _glibc()
        if self.ceiling is None or self._blocks < self._next or libc is None:
            return
        before = process_rss()
        if before is None or before <= self.ceiling:
            return
        libc.malloc_trim(0)
        self.trims += 1
        after = process_rss() or before
        self._backoff = 1 if before - after >= self.MIN_RELEASED else min(64, 2 * self._backoff)
        self._next = self._blocks + self._backoff


def release_free_heap() -> None:
    """Give the free memory of glibc's arenas back to the OS now (``malloc_trim``), e.g. after a
    large short-lived set of Python objects (tokenizers) is gone; no-op off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    """glibc loaded through ctypes (mallopt, malloc_trim), or None off glibc."""
    global _libc
    if _libc is False:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.mallopt, _libc.malloc_trim   # noqa: B018  (both must exist)
        except (OSError, AttributeError):
            _libc = None
    return _libc


_allocator_limited = False
_libc = False
