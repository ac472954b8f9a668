"""TIES (Yadav et al. 2023, "TIES-Merging") on one fp32 CPU tile in one compiled loop: the
magnitude trim of every task vector (``topk.top_kept``: exact top-k, ties at the threshold broken
by flat index), the weights, the sign election and the normalisation of ``merge.task_arithmetic``'s
``consensus: sum`` branch.

The torch path makes about twenty passes over the tile (differences, two ``hardshrink``s, weights,
votes, ``copysign``, clamps, signs, sums, a division, the base) with several tile-sized
temporaries; this is one pass in chunks of 2048 entries that stay in L1, each step a separate
vectorisable loop. The values are the torch path's bit for bit: the same fp32 operations in the
same order, the same zero signs (``clamp_min`` keeps −0, ``hardshrink`` writes +0, chosen ties
are added to +0), and ``hardshrink``'s NaN rule (an entry is dropped only when its magnitude
compares below the threshold). ``tests/test_ties_fused.py`` compares the two paths on tied,
signed-zero, non-finite and real bf16 task vectors.

Used when numba is installed, for ``sparsification: magnitude`` with ``consensus: sum`` and no
rescale, on fp32 CPU tiles with finite thresholds; None otherwise (the caller takes the torch path).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import topk_kernels

USE_NUMBA = True   # tests switch it off to compare with the torch path
_CHUNK = 2048      # entries per step: (models + 3) fp32 rows of scratch stay in L1


def applies(params) -> bool:
    """Whether ``merged`` can take ``params``' merge (the method, not yet the tile)."""
    return (USE_NUMBA and topk_kernels.USE_NUMBA and params.consensus == "sum" and params.sparsification == "magnitude" and not params.rescale
            and all(params.density(i) > 0 for i in range(len(params.weights))))


def merged(ctx, params, base: torch.Tensor, models) -> torch.Tensor | None:
    """base + λ · TIES(models − base) for this tile, as ``merge.task_arithmetic`` computes it with
    ``params`` (magnitude trims from ``ctx.stats``, the ``sum`` election, ``normalize``, λ), in
    fp32, or None where the compiled loop does not apply (see the module note). The tiles may be
    fp32 or, all of them, bf16 as stored: the loop widens bf16 exactly, as the executor's cast
    does, so ``task_arithmetic`` can take this path before any cast (``stored_inputs_path``).

    Example:
        >>> out = merged(ctx, params, base, [ft1, ft2])     # doctest: +SKIP
    """
    if (not applies(params) or topk_kernels.compiled() is None or base.device.type != "cpu"
            or base.dtype not in (torch.float32, torch.bfloat16)):
        return None
    tiles = [models[i] for i in range(len(models))]          # a lazily cast list: each cast once
    if any(m.dtype != base.dtype or m.device.type != "cpu" or m.shape != base.shape for m in tiles):
        return None
    numel = base.numel()
    rows = base.shape[0] if base.dim() else 1
    if numel == 0 or numel % rows:
        return None
    rules = [_trim_rule(ctx, params, i, rows, numel // rows, numel) for i in range(len(tiles))]
    if any(rule is None for rule in rules):
        return None
    thresholds, keep_all, whole_stop, cut_start, cut_stop, cut_allow = (np.array(column) for column in zip(*rules))
    bounds = np.array(sorted({0, numel, *whole_stop, *cut_start, *cut_stop}), dtype=np.int64)
    weights = np.array(params.weights, dtype=np.float32)
    positive = min(params.weights) > 0
    out = np.empty(numel, dtype=np.float32)
    topk_kernels.compiled().ties_merge(
        topk_kernels.flat(base), tuple(topk_kernels.flat(m) for m in tiles), thresholds.astype(np.float32), keep_all.astype(np.bool_),
        bounds[(bounds >= 0) & (bounds <= numel)], whole_stop.astype(np.int64), cut_start.astype(np.int64),
        cut_stop.astype(np.int64), cut_allow.astype(np.int64), weights, bool(params.normalize), positive,
        np.float32(min(params.weights) / 2 if positive else 0.0), np.float32(params.lam), params.lam != 1, out,
        np.empty((len(tiles) + 3, _CHUNK), dtype=np.float32))
    return torch.from_numpy(out).reshape(base.shape)


def warm(n_models: int) -> None:
    """Load the compiled loop for ``n_models`` task vectors (numba compiles, or loads from its
    cache, one version per model count) before a run measures its starting RSS; nothing without
    numba."""
    if not (USE_NUMBA and topk_kernels.USE_NUMBA) or topk_kernels.compiled() is None or n_models < 1:
        return
    ints = np.zeros(n_models, dtype=np.int64)
    for dtype in (np.float32, np.uint16):     # fp32 tiles, and bf16 ones as stored
        topk_kernels.compiled().ties_merge(
            np.zeros(8, dtype=dtype), tuple(np.ones(8, dtype=dtype) for _ in range(n_models)),
            np.zeros(n_models, dtype=np.float32), np.ones(n_models, dtype=np.bool_), np.array([0, 8], dtype=np.int64),
            ints + 8, ints, ints, ints, np.ones(n_models, dtype=np.float32), True, True, np.float32(0.5),
            np.float32(1.0), False, np.empty(8, dtype=np.float32), np.empty((n_models + 3, _CHUNK), dtype=np.float32))


def _trim_rule(ctx, params, i: int, rows: int, cols: int, numel: int):
    """Model i's trim on this tile as (threshold, keep everything before ``whole_stop``,
    whole_stop, cut_start, cut_stop, cut_allow), flat entry offsets in the tile: entries before
    whole_stop keep |τ| >= threshold, those of the cut row |τ| > threshold and the first
    cut_allow equal ones, the others |τ| > threshold (``topk.top_kept``'s rules); None where the
    threshold is not finite (the torch path's special cases)."""
    if not params.sparsifies(i):
        return 0.0, True, numel, 0, 0, 0
    threshold = ctx.stats["thresholds"][i][0]
    if not math.isfinite(threshold):
        return None
    needed, tied = ctx.stats["ties"][i][0] if "ties" in ctx.stats else (0, 0)
    whole, cut, allow = rows, 0, 0
    if needed == 0 and tied > 0:
        whole = 0
    elif needed < tied:
        before = ctx.stats["tie_before"][(i, 0)][ctx.start:ctx.start + rows + 1]
        whole = int((before[1:] <= needed).sum())       # a prefix of rows keeps all its ties
        if whole < rows and int(before[whole]) < needed:
            cut, allow = whole, needed - int(before[whole])
    cut_start, cut_stop = (cut * cols, (cut + 1) * cols) if allow else (0, 0)
    return threshold, not threshold > 0, whole * cols, cut_start, cut_stop, allow
