"""Per-tile statistics of exact top-k (``topk.py``): the histograms of |θi − θ0|'s fp32 bit
patterns and the per-row count of entries equal to a threshold, computed straight from the base
and model tiles.

Two implementations give the same integers. With numba installed (the ``diff`` and ``test``
extras) each statistic is one compiled loop over the tile, on fp32 tiles or on bf16 tiles as
stored (the engine then skips its fp32 copy; bf16 widens exactly) (the difference goes through a 16K
buffer, never a tile-sized temporary): 2-10x less CPU than the torch path, whose ``bincount`` on
real task vectors (a few hundred distinct high bit patterns per tile, so the same counters are
hit again and again) and boolean comparisons dominate a TIES merge. Without numba, or for other
dtypes and devices, the torch path computes the difference, its magnitude bits and a
``bincount``.

Counts only: no rounding anywhere, so both paths agree on every tensor (``tests/test_exact_topk.py``
compares them on tied, signed-zero, NaN and infinite entries).
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

from . import select

USE_NUMBA = importlib.util.find_spec("numba") is not None   # tests switch it off to run the torch path
_loaded = None                    # ops.compiled once imported (False: numba would not import)
_CHUNK = 16384                   # fp32 entries per buffered difference (64 KiB: stays in L2)


def _compiled(base: torch.Tensor, model: torch.Tensor) -> bool:
    """Whether the numba kernels apply: CPU tiles of one shape, both bf16 (as stored) or both fp32."""
    return (USE_NUMBA and compiled() is not None and base.device.type == "cpu" and model.device.type == "cpu"
            and base.dtype == model.dtype and base.dtype in (torch.bfloat16, torch.float32) and base.shape == model.shape)


def flat(x: torch.Tensor) -> np.ndarray:
    """The tile's entries in flat order: fp32 values, or bf16 bit patterns as uint16."""
    x = x.detach().reshape(-1).contiguous()
    return x.view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.bfloat16 else x.numpy()


def _difference(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """model − base in fp32 (the torch path; inputs of any dtype, cast as the executor casts)."""
    return model.to(torch.float32) - base.to(torch.float32)


def high_histogram(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """Counts of the high 16 bits of |model − base| (as fp32), ``select.HI_BINS`` int64 bins."""
    if not _compiled(base, model):
        return select.high_histogram(_difference(base, model))
    counts = np.zeros(select.HI_BINS, dtype=np.int64)
    compiled().high_counts(flat(base), flat(model), counts, np.empty(_CHUNK, dtype=np.float32))
    return torch.from_numpy(counts)


def low_histogram(base: torch.Tensor, model: torch.Tensor, high_bin: int, rows: int = 0):
    """Counts of the low 16 bits of the |model − base| whose high bits are ``high_bin``.

    With ``rows`` (the tile's rows, row-major), also the entries counted, in flat order, as
    int64 (row in the tile) << 16 | low bits: returns (counts, entries), entries None where the
    compiled loop does not apply (a caller then counts ties in a pass of its own)."""
    if not _compiled(base, model):
        counts = select.low_histogram(_difference(base, model), high_bin)
        return (counts, None) if rows else counts
    counts = np.zeros(select.LO_BINS, dtype=np.int64)
    listing = rows > 0 and base.numel() % rows == 0
    # a uint32 holds (row << 16 | low) while the tile has fewer than 2^16 rows (all but 1-D tiles)
    found = np.empty(base.numel() if listing else 0, dtype=np.uint32 if rows < 1 << 16 else np.int64)
    listed = compiled().low_counts(flat(base), flat(model), high_bin, counts, np.empty(_CHUNK, dtype=np.float32),
                                   base.numel() // rows if listing else 1, found)
    if not rows:
        return torch.from_numpy(counts)
    return torch.from_numpy(counts), (torch.from_numpy(found[:listed].astype(np.int64)) if listing else None)


def row_ties(base: torch.Tensor, model: torch.Tensor, rows: int, threshold: float) -> torch.Tensor:
    """Per row (``rows`` equal rows of the tile, row-major), how many |model − base| equal
    ``threshold`` exactly (int64; NaN equals nothing)."""
    if not _compiled(base, model) or rows <= 0 or base.numel() % rows:
        magnitude = _difference(base, model).abs_().reshape(max(1, rows), -1)
        equal = magnitude == threshold
        del magnitude
        # an int32 sum of a bool tile reduces in place; dtype=int64 first casts the whole tile to
        # int64 (8 bytes per entry), which no memory model saw
        counts = torch.int32 if equal.shape[1] < 2 ** 31 else torch.int64
        return equal.sum(1, dtype=counts).to(torch.int64)
    out = np.zeros(rows, dtype=np.int64)
    compiled().row_tie_counts(flat(base), flat(model), np.float32(threshold), out)
    return torch.from_numpy(out)


def compiled():
    """``ops.compiled`` (the numba loops), imported on first use; None without numba."""
    global _loaded
    if _loaded is None:
        try:
            from . import compiled as module
        except ImportError:   # pragma: no cover - exercised where numba is absent
            module = False
        _loaded = module
    return _loaded or None


def warm() -> None:
    """Load the compiled loops (numba, llvmlite and the cached machine code: ~120 MiB of RSS)
    now rather than on the first tile, so a run's measured starting RSS includes them. Idempotent;
    nothing without numba."""
    global _warmed
    if _warmed or not USE_NUMBA or compiled() is None:
        return
    for dtype in (torch.float32, torch.bfloat16):    # inputs as stored (bf16) or cast (fp32)
        base, model = torch.zeros(8, 8, dtype=dtype), torch.ones(8, 8, dtype=dtype)
        high_histogram(base, model)
        low_histogram(base, model, 0, 8)
        low_histogram(base, model, 0, 1 << 16)
        row_ties(base, model, 8, 1.0)
    compiled().drop(np.zeros(4, dtype=np.uint64), 0, np.ones(8, np.float32), np.empty(8, np.float32), np.float32(0.5))
    _warmed = True


_warmed = False
