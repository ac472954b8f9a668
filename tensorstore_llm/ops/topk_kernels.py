"""Per-tile statistics of exact top-k (``topk.py``): the histograms of |θi − θ0|'s fp32 bit
patterns and the per-row count of entries equal to a threshold, computed straight from the base
and model tiles.

Two implementations give the same integers. With numba installed (the ``diff`` and ``test``
extras) each statistic is one compiled loop over the tile (the difference goes through a 16K
buffer, never a tile-sized temporary): 5-10x less CPU than the torch path, whose ``bincount`` on
real task vectors (a few hundred distinct high bit patterns per tile, so the same counters are
hit again and again) and boolean comparisons dominate a TIES merge. Without numba, or for other
dtypes and devices, the torch path computes the difference, its magnitude bits and a
``bincount``.

Counts only: no rounding anywhere, so both paths agree on every tensor (``tests/test_exact_topk.py``
compares them on tied, signed-zero, NaN and infinite entries).
"""
from __future__ import annotations

import numpy as np
import torch

from . import select

try:
    import numba as _numba
except ImportError:   # pragma: no cover - exercised where numba is absent
    _numba = None

USE_NUMBA = _numba is not None   # tests switch it off to run the torch path on the same tiles
_CHUNK = 16384                   # fp32 entries per buffered difference (64 KiB: stays in L2)


def _compiled(base: torch.Tensor, model: torch.Tensor) -> bool:
    """Whether the numba kernels apply: fp32 tiles on the CPU."""
    return (USE_NUMBA and base.device.type == "cpu" and model.device.type == "cpu"
            and base.dtype == torch.float32 and model.dtype == torch.float32 and base.shape == model.shape)


def _flat(x: torch.Tensor) -> np.ndarray:
    return x.detach().reshape(-1).contiguous().numpy()


def high_histogram(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """Counts of the high 16 bits of |model − base| (as fp32), ``select.HI_BINS`` int64 bins."""
    if not _compiled(base, model):
        return select.high_histogram(model - base)
    counts = np.zeros(select.HI_BINS, dtype=np.int64)
    _high_nb(_flat(base), _flat(model), counts, np.empty(_CHUNK, dtype=np.float32))
    return torch.from_numpy(counts)


def low_histogram(base: torch.Tensor, model: torch.Tensor, high_bin: int) -> torch.Tensor:
    """Counts of the low 16 bits of the |model − base| whose high bits are ``high_bin``."""
    if not _compiled(base, model):
        return select.low_histogram(model - base, high_bin)
    counts = np.zeros(select.LO_BINS, dtype=np.int64)
    _low_nb(_flat(base), _flat(model), high_bin, counts, np.empty(_CHUNK, dtype=np.float32))
    return torch.from_numpy(counts)


def row_ties(base: torch.Tensor, model: torch.Tensor, rows: int, threshold: float) -> torch.Tensor:
    """Per row (``rows`` equal rows of the tile, row-major), how many |model − base| equal
    ``threshold`` exactly (int64; NaN equals nothing)."""
    if not _compiled(base, model) or rows <= 0 or base.numel() % rows:
        magnitude = (model - base).abs_().reshape(max(1, rows), -1)
        equal = magnitude == threshold
        del magnitude
        # an int32 sum of a bool tile reduces in place; dtype=int64 first casts the whole tile to
        # int64 (8 bytes per entry), which no memory model saw
        counts = torch.int32 if equal.shape[1] < 2 ** 31 else torch.int64
        return equal.sum(1, dtype=counts).to(torch.int64)
    out = np.zeros(rows, dtype=np.int64)
    _ties_nb(_flat(base), _flat(model), np.float32(threshold), out)
    return torch.from_numpy(out)


if _numba is not None:
    @_numba.njit(cache=True, nogil=True)
    def _difference(base, model, start, stop, buffer):
        """buffer[:stop - start] = model[start:stop] − base[start:stop] (fp32)."""
        for j in range(stop - start):
            buffer[j] = model[start + j] - base[start + j]

    @_numba.njit(cache=True, nogil=True)
    def _high_nb(base, model, counts, buffer):
        bits = buffer.view(np.int32)
        n = base.size
        for start in range(0, n, buffer.size):
            stop = min(n, start + buffer.size)
            _difference(base, model, start, stop, buffer)
            for j in range(stop - start):
                counts[(bits[j] >> 16) & 0x7FFF] += 1     # sign bit dropped: the bits of |x|

    @_numba.njit(cache=True, nogil=True)
    def _low_nb(base, model, high_bin, counts, buffer):
        bits = buffer.view(np.int32)
        n = base.size
        for start in range(0, n, buffer.size):
            stop = min(n, start + buffer.size)
            _difference(base, model, start, stop, buffer)
            for j in range(stop - start):
                magnitude = bits[j] & 0x7FFFFFFF
                if (magnitude >> 16) == high_bin:
                    counts[magnitude & 0xFFFF] += 1

    @_numba.njit(cache=True, nogil=True)
    def _ties_nb(base, model, threshold, out):
        cols = base.size // out.size
        for r in range(out.size):
            found = 0
            for j in range(r * cols, (r + 1) * cols):
                if abs(model[j] - base[j]) == threshold:
                    found += 1
            out[r] = found
