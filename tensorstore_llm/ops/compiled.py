"""The numba loops of exact top-k's statistics (``topk_kernels.py``) and of DARE's drop
(``dare_mask.py``). Imported only when one of them first runs (``topk_kernels.compiled()``), so that a merge
that needs none of them never loads numba (~0.3 s and ~100 MiB of RSS for llvmlite)."""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _difference(base, model, start, stop, buffer):
    """buffer[:stop - start] = model[start:stop] − base[start:stop] (fp32)."""
    for j in range(stop - start):
        buffer[j] = model[start + j] - base[start + j]


@numba.njit(cache=True, nogil=True)
def high_counts(base, model, counts, buffer):
    bits = buffer.view(np.int32)
    n = base.size
    for start in range(0, n, buffer.size):
        stop = min(n, start + buffer.size)
        _difference(base, model, start, stop, buffer)
        for j in range(stop - start):
            counts[(bits[j] >> 16) & 0x7FFF] += 1     # sign bit dropped: the bits of |x|


@numba.njit(cache=True, nogil=True)
def low_counts(base, model, high_bin, counts, buffer):
    bits = buffer.view(np.int32)
    n = base.size
    for start in range(0, n, buffer.size):
        stop = min(n, start + buffer.size)
        _difference(base, model, start, stop, buffer)
        for j in range(stop - start):
            magnitude = bits[j] & 0x7FFFFFFF
            if (magnitude >> 16) == high_bin:
                counts[magnitude & 0xFFFF] += 1


@numba.njit(cache=True, nogil=True)
def row_tie_counts(base, model, threshold, out):
    cols = base.size // out.size
    for r in range(out.size):
        found = 0
        for j in range(r * cols, (r + 1) * cols):
            if abs(model[j] - base[j]) == threshold:
                found += 1
        out[r] = found


@numba.njit(cache=True, nogil=True)
def drop(state, skip, delta, out, p):
    """out = delta * keep for one row group's entries from ``skip`` on: keep is 1 where
    p − u > 0 (fp32), u the 24-bit fraction of the next 32-bit half of SFC64's output."""
    a, b, c, counter = state[0], state[1], state[2], state[3]
    one = np.uint64(1)
    scale = np.float32(2.0 ** -24)
    word = np.uint64(0)
    for e in range(skip + delta.size):   # entries before skip: drawn, not used
        if e % 2 == 0:   # the next 64-bit word: NumPy's sfc64_next
            word = a + b + counter
            counter += one
            a = b ^ (b >> np.uint64(11))
            b = c + (c << np.uint64(3))
            c = ((c << np.uint64(24)) | (c >> np.uint64(40))) + word
            half = word & np.uint64(0xFFFFFFFF)
        else:
            half = word >> np.uint64(32)
        if e < skip:
            continue
        u = np.float32(half & np.uint64(0xFFFFFF)) * scale
        keep = np.float32(1.0) if p - u > np.float32(0.0) else np.float32(0.0)
        out[e - skip] = delta[e - skip] * keep
