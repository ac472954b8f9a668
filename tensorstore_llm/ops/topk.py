"""Exact top-k of task-vector magnitudes, streamed: the statistics passes and the masks of TIES
(``magnitude``) and Model Breadcrumbs (``magnitude_outliers``), used by ``sparsify.py``.

Magnitude masks keep exactly the requested number of entries (TIES: max(1, ⌊density·n⌋), as
mergekit; breadcrumbs: ⌊density·n⌋ after dropping the top ones). Entries are ordered by magnitude,
descending, and equal magnitudes by flat (row-major) index, ascending: of the entries tied at a
threshold, the first ones in flat order count as the larger. Thresholds are exact (radix select
on fp32 bit patterns, ``select.py``): a histogram of the high 16 bits, then of the low 16 bits in
the bin holding the k-th value. When a threshold's value is shared by more entries than the count
needs (real bf16 task vectors have only thousands of distinct magnitudes per tensor), the tied
entries of each row are counted, so a block knows how many came before it: the kept set is the
same under any blocking, resume or device. The low pass counts them itself from its listing of the
threshold bin's entries (compiled path, up to ``LISTED_BYTES`` per tensor); otherwise a third pass
does. The per-tile statistics are ``topk_kernels.py``'s
(compiled when numba is installed; the same integers either way).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import select, topk_kernels
from .registry import StatsPass


def ranks_wanted(params, i: int, numel: int) -> list[int]:
    """Descending magnitude ranks whose values bound model i's kept entries."""
    if not params.sparsifies(i) or params.density(i) <= 0 or numel == 0:
        return []
    if params.sparsification == "magnitude":
        return [max(1, int(params.density(i) * numel))]
    if params.sparsification == "magnitude_outliers":
        target = int(params.density(i) * numel)
        top_cut = numel - max(0, numel - target - int(params.gamma(i) * numel)) - target
        return [top_cut, top_cut + target]
    return []


def kept_counts(params, numel: int) -> list[int | None]:
    """How many entries of each model's task vector the magnitude sparsifications keep (exactly:
    ties are broken by flat index); None for a model whose count is a random draw (DARE, DELLA:
    ``density`` is then the expected share) and ``numel`` for one not sparsified."""
    counts = []
    for i in range(len(params.weights)):
        ranks = ranks_wanted(params, i, numel)
        if not params.sparsifies(i):
            counts.append(numel)
        elif params.density(i) <= 0:
            counts.append(0)
        elif params.sparsification == "magnitude":
            counts.append(ranks[0])
        elif params.sparsification == "magnitude_outliers":
            counts.append(ranks[1] - ranks[0])
        else:
            counts.append(None)
    return counts


# -- statistics passes: high bins, low bins (the thresholds), tied entries per row ---------------

LISTED_BYTES = 16 << 20   # at most this much of listed threshold-bin entries per tensor (8 bytes each)


@dataclass(frozen=True)
class StoredInputsPass(StatsPass):
    """A statistics pass whose map takes CPU tiles in their stored dtype (bf16 or fp32, anything
    else cast by the map) and forms the fp32 differences itself, with the executor's fp32
    rounding: the engine skips its cast (``engine/compute.py``) where it would compute in fp32
    on the CPU, saving a bf16 -> fp32 copy of every input tile in every pass."""

    stored_inputs: bool = True


def high_map(ctx, params, base, models):
    """Per model with a cut: the histogram of its |τi|'s high 16 bits over this tile."""
    numel = math.prod(ctx.shape)
    return {i: topk_kernels.high_histogram(base, models[i]) for i in range(len(params.weights))
            if ranks_wanted(params, i, numel)}


def high_reduce(params, partials, ctx):
    """Per model and cut: (k, high bin of the k-th largest, entries in higher bins); and the cuts
    whose bin's entries the low pass lists (``listed``: so that it can count ties itself), while
    they take at most ``LISTED_BYTES``."""
    numel = math.prod(ctx.shape)
    found, in_bin = {}, {}
    for i in range(len(params.weights)):
        ks = ranks_wanted(params, i, numel)
        if ks:
            histogram = sum(p[i] for p in partials)
            found[i] = [(k, *select.bin_of_kth_largest(histogram, k)) if k > 0 else (0, -1, 0) for k in ks]
            in_bin.update({(i, j): int(histogram[high]) for j, (k, high, _a) in enumerate(found[i]) if k > 0})
    listed = sorted(in_bin) if ctx.shape and 8 * sum(in_bin.values()) <= LISTED_BYTES else []
    return {"bins": found, "listed": listed}


def low_map(ctx, params, base, models):
    """Per (model, cut): the histogram of the low 16 bits inside the cut's high bin; for the
    ``listed`` cuts also ("entries", model, cut): [(tile start row, the bin's entries as
    row << 16 | low bits, or None where the torch path ran)]."""
    out = {}
    rows = max(1, ctx.stop - ctx.start)
    for i, entries in ctx.stats["bins"].items():
        for j, (k, high, _above) in enumerate(entries):
            if k > 0 and (i, j) in ctx.stats.get("listed", ()):
                out[(i, j)], listed = topk_kernels.low_histogram(base, models[i], high, rows)
                out[("entries", i, j)] = [(ctx.start, listed)]
            elif k > 0:
                out[(i, j)] = topk_kernels.low_histogram(base, models[i], high)
    return out


def low_reduce(params, partials, ctx):
    """The threshold values, and per threshold (entries equal to it that count as above, entries
    equal to it): the k-th largest is reached after ``above`` larger ones and ``needed`` ties.
    Where the low pass listed the bin's entries and the threshold needs a tie-break, also the
    tied entries before each row (``tie_before``, as ``tie_reduce`` gives them)."""
    thresholds, ties, before = {}, {}, {}
    for i, entries in ctx.stats["bins"].items():
        values, counts = [], []
        for j, (k, high, above) in enumerate(entries):
            if k <= 0:
                values.append(math.inf)  # nothing is this large: no upper cut
                counts.append((0, 0))
                continue
            histogram = sum(p[(i, j)] for p in partials)
            low, above_in_bin = select.bin_of_kth_largest(histogram, k - above)
            values.append(select.threshold_value(high, low))
            counts.append((k - above - above_in_bin, int(histogram[low])))
            listed = [item for p in partials for item in p.get(("entries", i, j), [])]
            if 0 < counts[-1][0] < counts[-1][1] and listed and all(found is not None for _r, found in listed):
                before[(i, j)] = _tie_before(listed, low, ctx.shape[0])
        thresholds[i], ties[i] = values, counts
    return {"thresholds": thresholds, "ties": ties, "tie_before": before}


def _tie_before(listed, low: int, rows: int) -> torch.Tensor:
    """Tied entries before each row (length rows + 1) from the listed entries of the threshold's
    bin: those whose low bits are the threshold's."""
    tied_rows = [start + (found[(found & 0xFFFF) == low] >> 16) for start, found in listed]
    per_row = torch.bincount(torch.cat(tied_rows), minlength=rows) if tied_rows else torch.zeros(rows, dtype=torch.int64)
    return F.pad(per_row.cumsum(0), (1, 0))


def tie_breaks(ctx):
    """(model, threshold index) pairs whose tied entries are only partly inside the kept count
    and whose tie counts the low pass did not find."""
    done = ctx.stats.get("tie_before", {})
    return [(i, j) for i, counts in ctx.stats["ties"].items() for j, (needed, tied) in enumerate(counts)
            if 0 < needed < tied and (i, j) not in done]


def tie_map(ctx, params, base, models):
    """Per row of this tile, how many of model i's entries equal threshold j (int64), where that
    threshold needs a tie-break (nothing, and no input touched, where none does)."""
    rows = max(1, ctx.stop - ctx.start)
    return {(i, j): topk_kernels.row_ties(base, models[i], rows, ctx.stats["thresholds"][i][j])
            for i, j in tie_breaks(ctx)}


def tie_reduce(params, partials, ctx):
    """Tied entries before each row: ``tie_before[(i, j)][r]`` counts rows < r (length rows + 1)."""
    before = dict(ctx.stats.get("tie_before", {}))
    for key in tie_breaks(ctx):
        per_row = torch.cat([p[key].cpu() for p in partials])
        before[key] = F.pad(per_row.cumsum(0), (1, 0))
    return {"tie_before": before}


def add_histograms(a: dict, b: dict) -> dict:
    """Fold of two tiles' partials: histograms added, entry lists joined in tile order."""
    return {key: a[key] + b[key] for key in a}


# -- masks --------------------------------------------------------------------------------------

def within_top(ctx, i: int, j: int, magnitude: torch.Tensor) -> torch.Tensor:
    """Whether each entry of this tile is among the k_j largest of model i's whole tensor
    (magnitude descending, then flat index ascending): a bool tensor shaped like ``magnitude``.
    Statistics holding thresholds but no tie counts (a kernel called by hand) keep every entry
    equal to the threshold."""
    threshold = ctx.stats["thresholds"][i][j]
    needed, tied = ctx.stats["ties"][i][j] if "ties" in ctx.stats else (0, 0)
    if needed >= tied:          # every entry equal to the threshold is in (also: no threshold)
        return magnitude >= threshold
    if needed == 0:
        return magnitude > threshold
    equal = magnitude == threshold
    rows = magnitude.shape[0] if magnitude.dim() else 1
    # tied entries before each row boundary of this tile (rows + 1 counts, from the tie pass):
    # rows whose ties all come before the cut keep every tied entry, rows after it none, and one
    # row at most is cut inside, where only that row's ties are counted (no tile-sized index)
    before = ctx.stats["tie_before"][(i, j)][ctx.start:ctx.start + rows + 1]
    row_in = (before[1:] <= needed).to(magnitude.device)
    kept = magnitude > threshold
    kept |= equal & row_in.view(-1, *[1] * (magnitude.dim() - 1))
    cut = ((before[:-1] < needed) & (before[1:] > needed)).nonzero()
    if len(cut):
        r = int(cut[0])
        row_equal = equal[r].reshape(-1)
        row_kept = row_equal & (row_equal.cumsum(0) <= needed - int(before[r]))
        kept[r] |= row_kept.reshape(kept[r].shape)
    return kept


def top_kept(ctx, i: int, j: int, delta: torch.Tensor) -> torch.Tensor:
    """``delta`` with every entry outside model i's k_j largest magnitudes set to 0 (the order of
    ``within_top``), in ``hardshrink``s (no boolean mask: 5x faster on CPU). Rows before the tie
    cut keep their tied entries, rows after it drop them, so only the one row at the cut needs a
    mask."""
    threshold = ctx.stats["thresholds"][i][j]
    if threshold == math.inf:
        return torch.zeros_like(delta)
    needed, tied = ctx.stats["ties"][i][j] if "ties" in ctx.stats else (0, 0)
    if needed >= tied:
        return F.hardshrink(delta, fp32_below(threshold)) if threshold > 0 else delta.clone()
    if needed == 0:
        return F.hardshrink(delta, threshold)                 # |x| > threshold
    rows = delta.shape[0]
    before = ctx.stats["tie_before"][(i, j)][ctx.start:ctx.start + rows + 1]
    whole = int((before[1:] <= needed).sum())                 # a prefix of rows keeps all its ties
    if whole == rows:                                         # a tile before the cut: one shrink
        return F.hardshrink(delta, fp32_below(threshold)) if threshold > 0 else delta.clone()
    strict = F.hardshrink(delta, threshold)
    if whole:
        strict[:whole] = F.hardshrink(delta[:whole], fp32_below(threshold)) if threshold > 0 else delta[:whole]
    if whole < rows and before[whole] < needed:               # the row cut inside
        row = delta[whole]
        equal = row.abs().reshape(-1) == threshold
        chosen = equal & (equal.cumsum(0) <= needed - int(before[whole]))
        strict[whole] += torch.where(chosen, row.reshape(-1), 0.0).reshape(row.shape)
    return strict


def fp32_below(value: float) -> float:
    """The largest fp32 value below ``value``."""
    return float(np.nextafter(np.float32(value), np.float32(-np.inf)))
