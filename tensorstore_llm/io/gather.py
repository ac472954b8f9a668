"""Rows of a tensor by index, read through any TensorSource with bounded memory."""
from __future__ import annotations

import numpy as np
import torch

from ..dtypes import by_name

MIN_CHUNK = 64   # rows: the smallest read unit of a gather
COPY_BYTES = 8 << 20   # rows are moved from a read into ``out`` this many bytes at a time


def gather_rows(source, name: str, index: np.ndarray, out: torch.Tensor | None = None,
                positions: np.ndarray | None = None) -> torch.Tensor:
    """Rows ``index`` (any order, repeats allowed) of tensor ``name``, written into ``out`` at
    ``positions`` (default: a new tensor, row i = row ``index[i]``). The tensor is seen as
    aligned chunks of ``max(len(index), MIN_CHUNK)`` rows; each chunk holding wanted rows is read
    once, from its first to its last wanted row, so at most one chunk (about the block's own size)
    is held besides ``out``, and a block of nearby rows is one read. Rows move from the read into
    ``out`` ``COPY_BYTES`` at a time (indexing all of them at once would hold a second copy)."""
    if out is None:
        meta = source.meta(name)
        out = torch.empty((len(index), *meta.shape[1:]), dtype=by_name(meta.dtype).torch)
        positions = np.arange(len(index))
    if len(index) == 0:
        return out
    sorter = np.argsort(index, kind="stable")
    ordered = index[sorter]
    chunk = max(len(index), MIN_CHUNK)
    cuts = np.nonzero(np.diff(ordered // chunk))[0] + 1
    step = max(MIN_CHUNK, COPY_BYTES // max(1, out[:1].numel() * out.element_size()))
    for lo_at, hi_at in zip([0, *cuts.tolist()], [*cuts.tolist(), len(ordered)]):
        lo, hi = int(ordered[lo_at]), int(ordered[hi_at - 1]) + 1
        block = source.read_rows(name, lo, hi)
        for at in range(lo_at, hi_at, step):
            upto = min(hi_at, at + step)
            out[torch.from_numpy(positions[sorter[at:upto]])] = block[torch.from_numpy(ordered[at:upto] - lo)]
        del block
    return out
