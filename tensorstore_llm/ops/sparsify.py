"""Sparsification of task vectors: the masks of TIES, DARE, Model Breadcrumbs and DELLA, and the
statistics passes that find their thresholds (anchor: mergekit's ``sparsify.py``, same defaults).

- TIES (Yadav et al. 2023, "TIES-Merging"), ``magnitude``: keep the top density-fraction of |τi|.
- DARE (Yu et al. 2024, "Language Models are Super Mario"), ``random``: keep each entry with
  probability density, rescale the survivors. Rescaling by default divides by the keep
  probability, as the paper does (unbiased, no extra pass); ``rescale_method: l1`` restores each
  task vector's L1 norm as mergekit does (one more pass over the tensor).
- Model Breadcrumbs (Davari & Belilovsky 2024), ``magnitude_outliers``: drop the largest
  gamma-fraction and the smallest entries so that density remains.
- DELLA (Deep et al. 2024), ``della``: keep probabilities rise with the magnitude rank within each
  row, from density − ε to density + ε; survivors are divided by their own keep probability (the
  paper's rescaling) unless ``rescale_method: l1``. A row is the last axis of a tensor of two or
  more dims (always whole inside a block) and the whole tensor for a 1-D tensor (as mergekit),
  ranked in a statistics pass, so the ranks never depend on the block size or the device's tile.
  Tied magnitudes rank by position (stable sorts), the same everywhere.

Magnitude masks keep exactly the requested number of entries (TIES: max(1, ⌊density·n⌋), as
mergekit; breadcrumbs: ⌊density·n⌋ after dropping the top ones). Entries are ordered by magnitude,
descending, and equal magnitudes by flat (row-major) index, ascending: of the entries tied at a
threshold, the first ones in flat order count as the larger. Thresholds are exact (``select.py``);
when a threshold's value is shared by more entries than the count needs (real bf16 task vectors
have only thousands of distinct magnitudes per tensor), a third pass counts the tied entries of
each row, so a block knows how many came before it: the kept set is the same under any blocking,
resume or device. Random masks come from ``ctx.uniform`` under the stream name
``task_arithmetic/model{i}`` whichever op sparsifies (seeded per tensor, model and row group, so
the mergekit replay draws the same masks), never a global RNG.

``params`` is any object with ``weights``, ``sparsification``, ``rescale``, ``rescale_method``,
``rank_pass`` and the per-model ``density(i)``, ``gamma(i)``, ``epsilon(i)``, ``sparsifies(i)``
(``ops.merge.TaskArithmeticParams``).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RecipeError
from . import select
from .exact import divide_
from .registry import StatsPass

MASK_STREAM = "task_arithmetic"   # random masks are drawn as this op's, whichever op sparsifies
SPARSIFICATIONS = ("none", "magnitude", "random", "magnitude_outliers", "della")
RESCALE_METHODS = ("l1", "inverse")


# -- statistics passes -------------------------------------------------------------------------

def _ranks_wanted(params, i: int, numel: int) -> list[int]:
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
        ranks = _ranks_wanted(params, i, numel)
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


def _deltas(base, models):
    return [m - base for m in models]


def _hi_map(ctx, params, base, models):
    numel = math.prod(ctx.shape)
    return {i: select.high_histogram(d) for i, d in enumerate(_deltas(base, models)) if _ranks_wanted(params, i, numel)}


def _hi_reduce(params, partials, ctx):
    numel = math.prod(ctx.shape)
    found = {}
    for i in range(len(params.weights)):
        ks = _ranks_wanted(params, i, numel)
        if ks:
            histogram = sum(p[i] for p in partials)
            found[i] = [(k, *select.bin_of_kth_largest(histogram, k)) if k > 0 else (0, -1, 0) for k in ks]
    return {"bins": found}


def _lo_map(ctx, params, base, models):
    out = {}
    for i, d in enumerate(_deltas(base, models)):
        for j, (k, high, _above) in enumerate(ctx.stats["bins"].get(i, [])):
            if k > 0:
                out[(i, j)] = select.low_histogram(d, high)
    return out


def _lo_reduce(params, partials, ctx):
    """The threshold values, and per threshold (entries equal to it that count as above, entries
    equal to it): the k-th largest is reached after ``above`` larger ones and ``needed`` ties."""
    thresholds, ties = {}, {}
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
        thresholds[i], ties[i] = values, counts
    return {"thresholds": thresholds, "ties": ties}


def _tie_breaks(ctx):
    """(model, threshold index) pairs whose tied entries are only partly inside the kept count."""
    return [(i, j) for i, counts in ctx.stats["ties"].items() for j, (needed, tied) in enumerate(counts)
            if 0 < needed < tied]


def _tie_map(ctx, params, base, models):
    """Per row of this tile, how many of model i's entries equal threshold j (int64), where that
    threshold needs a tie-break."""
    out = {}
    for i, j in _tie_breaks(ctx):
        magnitude = (models[i] - base).abs_().reshape(max(1, ctx.stop - ctx.start), -1)
        equal = magnitude == ctx.stats["thresholds"][i][j]
        del magnitude
        # an int32 sum of a bool tile reduces in place; dtype=int64 first casts the whole tile to
        # int64 (8 bytes per entry: measured +64 MiB on a 16 MiB tile), which no memory model saw
        counts = torch.int32 if equal.shape[1] < 2 ** 31 else torch.int64
        out[(i, j)] = equal.sum(1, dtype=counts).to(torch.int64)
    return out


def _tie_reduce(params, partials, ctx):
    """Tied entries before each row: ``tie_before[(i, j)][r]`` counts rows < r (length rows + 1)."""
    before = {}
    for key in _tie_breaks(ctx):
        per_row = torch.cat([p[key].cpu() for p in partials])
        before[key] = F.pad(per_row.cumsum(0), (1, 0))
    return {"tie_before": before}


def _l1_map(ctx, params, base, models):
    out = {}
    for i, d in enumerate(_deltas(base, models)):
        if params.sparsifies(i):
            rows = d.reshape(max(1, ctx.stop - ctx.start), -1)
            kept = _mask(ctx, params, i, d).reshape(rows.shape)
            out[i] = (rows.abs().sum(1, dtype=torch.float64), (rows * kept).abs().sum(1, dtype=torch.float64))
    return out


def _l1_reduce(params, partials, ctx, eps: float = 1e-7):
    ratios = {}
    for i in range(len(params.weights)):
        if params.sparsifies(i):
            before = torch.cat([p[i][0] for p in partials]).sum().item()
            after = torch.cat([p[i][1] for p in partials]).sum().item()
            ratios[i] = 1.0 if before < eps or after < eps else before / after
    return {"l1_ratio": ratios}


def _rank_map(ctx, params, base, models):
    """DELLA on a 1-D tensor: each sparsified model's |τi| of this tile (rows in order)."""
    if len(ctx.shape) != 1:
        return {}
    return {i: (models[i] - base).abs_() for i in range(len(params.weights)) if params.sparsifies(i)}


def _rank_reduce(params, partials, ctx):
    """Magnitude ranks 0..n-1 over the whole 1-D tensor (stable: ties rank by position), as fp32.

    Memory: the tile magnitudes and their concatenation (4 + 4 bytes per entry), the sort order
    and positions (8 + 8, for a moment) and the fp32 ranks kept for the kernel (4 per entry per
    model). LLM 1-D tensors are norms and biases of a few thousand to a few hundred thousand entries.
    """
    if len(ctx.shape) != 1 or not partials or not partials[0]:
        return {}
    ranks = {}
    for i in partials[0]:
        magnitude = torch.cat([p[i] for p in partials])
        order = magnitude.argsort(stable=True)
        del magnitude
        position = torch.arange(order.numel(), device=order.device).to(torch.float32)
        ranks[i] = torch.empty_like(position).scatter_(0, order, position)   # ranks[order[j]] = j
    return {"ranks": ranks}


def _add_histograms(a: dict, b: dict) -> dict:
    return {key: a[key] + b[key] for key in a}


def sparsify_passes(params) -> tuple[StatsPass, ...]:
    """The statistics passes ``params``' sparsification needs before the kernel runs (magnitude
    thresholds, DELLA's 1-D ranks, L1 ratios), in the order they must run."""
    passes = []
    if params.sparsification == "della" and params.rank_pass and any(params.sparsifies(i) for i in range(len(params.weights))):
        passes.append(StatsPass(_rank_map, _rank_reduce))   # first: the L1 pass below needs the ranks
    if params.sparsification in ("magnitude", "magnitude_outliers") and any(params.sparsifies(i) for i in range(len(params.weights))):
        passes += [StatsPass(_hi_map, _hi_reduce, _add_histograms), StatsPass(_lo_map, _lo_reduce, _add_histograms),
                   StatsPass(_tie_map, _tie_reduce)]
    if params.rescale and params.rescale_method == "l1" and any(params.sparsifies(i) for i in range(len(params.weights))):
        passes.append(StatsPass(_l1_map, _l1_reduce))
    return tuple(passes)


# -- masks -------------------------------------------------------------------------------------

def _keep_probability(ctx, params, i: int, delta: torch.Tensor):
    """Per-entry keep probability of the random methods (a float for DARE, a tensor for DELLA)."""
    density = params.density(i)
    if params.sparsification == "random":
        return density
    # della: the probability grows linearly with the magnitude rank inside each row
    if len(ctx.shape) == 1:   # the row is the whole tensor: ranks from the statistics pass
        ranks, spread = _whole_tensor_ranks(ctx, params, i, delta), max(ctx.shape[0] - 1, 1)
    else:
        magnitude = delta.abs()
        rows = magnitude.reshape(-1, delta.shape[-1]) if delta.dim() > 1 else magnitude.reshape(1, -1)
        ranks, spread = _row_ranks(rows), max(rows.shape[1] - 1, 1)
    return divide_(ranks, spread).mul_(2 * params.epsilon(i)).add_(density - params.epsilon(i)).reshape(delta.shape)


def _row_ranks(magnitude: torch.Tensor) -> torch.Tensor:
    """Ascending rank of each entry within its row (fp32, 0 .. cols-1), tied magnitudes ranked by
    position: what a stable argsort of an argsort gives, the same on every device.

    On CPU each entry becomes one int64 key, its magnitude's bits (non-negative floats order as
    their bit patterns) above its column, and NumPy's SIMD sort orders the keys: 10x less CPU than
    two stable argsorts (6 vs 66 ms per 256 x 2048 tile, one thread); elsewhere one stable
    argsort and a scatter of the positions.
    """
    cols = magnitude.shape[1]
    position = torch.arange(cols, dtype=torch.float32, device=magnitude.device).expand(magnitude.shape)
    shift = max(1, (cols - 1).bit_length())
    if magnitude.device.type != "cpu" or magnitude.dtype == torch.float64 or shift > 32:
        order = magnitude.argsort(dim=1, stable=True)
    else:
        bits = magnitude.to(torch.float32).contiguous().numpy().view(np.int32)      # [rows, cols], >= 0
        keys = bits.astype(np.int64)
        keys <<= shift
        keys |= np.arange(cols, dtype=np.int64)
        keys.sort(axis=1)                                                            # keys are unique
        keys &= (1 << shift) - 1
        order = torch.from_numpy(keys)                                               # [rows, cols] columns
    return torch.empty(magnitude.shape, dtype=torch.float32, device=magnitude.device).scatter_(1, order, position)


def _whole_tensor_ranks(ctx, params, i: int, delta: torch.Tensor) -> torch.Tensor:
    """Ranks of this tile's entries among the whole 1-D tensor's magnitudes (fp32, 0 .. n-1)."""
    found = (ctx.stats or {}).get("ranks", {}).get(i)
    if found is not None:
        return found[ctx.start:ctx.stop]
    if ctx.start == 0 and ctx.stop == ctx.shape[0]:   # the tile is the whole tensor: rank it here
        return delta.abs().argsort(stable=True).argsort(stable=True).to(torch.float32)
    raise RecipeError(f"della on 1-D tensor {ctx.output!r} split into row blocks needs its rank pass "
                      f"(TaskArithmeticParams.rank_pass=True)")


def _mask(ctx, params, i: int, delta: torch.Tensor, probability=None) -> torch.Tensor:
    """Which entries of τi survive sparsification (a bool tensor shaped like ``delta``)."""
    if params.density(i) <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    if params.sparsification == "magnitude":
        return _within_top(ctx, i, 0, delta.abs())
    if params.sparsification == "magnitude_outliers":
        magnitude = delta.abs()
        return _within_top(ctx, i, 1, magnitude) & ~_within_top(ctx, i, 0, magnitude)
    if probability is None:
        probability = _keep_probability(ctx, params, i, delta)
    return _uniform(ctx, i).reshape(delta.shape) < probability


def _within_top(ctx, i: int, j: int, magnitude: torch.Tensor) -> torch.Tensor:
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


def _magnitude_kept(ctx, params, i: int, delta: torch.Tensor):
    """``delta * _mask(...)`` for the magnitude methods on fp32, in ``hardshrink``s (no boolean
    mask: 5x faster on CPU, same values, and the same temporaries with or without a tie-break);
    None where that does not apply."""
    if delta.dtype != torch.float32 or params.density(i) <= 0:
        return None
    if params.sparsification == "magnitude":
        return _top_kept(ctx, i, 0, delta)
    if params.sparsification == "magnitude_outliers":
        kept = _top_kept(ctx, i, 1, delta)
        if ctx.stats["thresholds"][i][0] != math.inf:
            kept -= _top_kept(ctx, i, 0, delta)   # within the top k1 but not the top k0: x - x = 0 exactly
        return kept
    return None


def _top_kept(ctx, i: int, j: int, delta: torch.Tensor) -> torch.Tensor:
    """``delta`` with every entry outside model i's k_j largest magnitudes set to 0 (the order of
    ``_within_top``). Rows before the tie cut keep their tied entries, rows after it drop them, so
    only the one row at the cut needs a mask."""
    threshold = ctx.stats["thresholds"][i][j]
    if threshold == math.inf:
        return torch.zeros_like(delta)
    strict = F.hardshrink(delta, threshold)                 # |x| > threshold
    needed, tied = ctx.stats["ties"][i][j] if "ties" in ctx.stats else (0, 0)
    if needed >= tied:
        return F.hardshrink(delta, _fp32_below(threshold)) if threshold > 0 else delta.clone()
    if needed == 0:
        return strict
    rows = delta.shape[0]
    before = ctx.stats["tie_before"][(i, j)][ctx.start:ctx.start + rows + 1]
    whole = int((before[1:] <= needed).sum())                 # a prefix of rows keeps all its ties
    if whole:
        strict[:whole] = F.hardshrink(delta[:whole], _fp32_below(threshold)) if threshold > 0 else delta[:whole]
    if whole < rows and before[whole] < needed:               # the row cut inside
        row = delta[whole]
        equal = row.abs().reshape(-1) == threshold
        chosen = equal & (equal.cumsum(0) <= needed - int(before[whole]))
        strict[whole] += torch.where(chosen, row.reshape(-1), 0.0).reshape(row.shape)
    return strict


def _random_kept(ctx, params, i: int, delta: torch.Tensor, probability):
    """``delta * _mask(...)`` for DARE / DELLA on fp32: sign(p - u) clamped at 0 is 1 exactly
    where u < p, and a float multiply is 2.5x faster than one by a boolean mask."""
    if delta.dtype != torch.float32 or params.density(i) <= 0:
        return None
    uniform = _uniform(ctx, i).reshape(delta.shape)
    return delta * uniform.neg_().add_(probability).sign_().clamp_min_(0)


def _uniform(ctx, i: int) -> torch.Tensor:
    """Model i's uniform draws for this block, the same for every op that sparsifies."""
    return dataclasses.replace(ctx, op=MASK_STREAM).uniform(f"model{i}")


def _fp32_below(value: float) -> float:
    return float(np.nextafter(np.float32(value), np.float32(-np.inf)))


def sparsify(ctx, params, i: int, delta: torch.Tensor) -> torch.Tensor:
    """Model i's task vector ``delta`` with the entries its sparsification drops set to 0 and the
    survivors rescaled as ``params`` ask (``delta`` itself when model i is not sparsified)."""
    if not params.sparsifies(i):
        return delta
    random = params.sparsification in ("random", "della")
    probability = _keep_probability(ctx, params, i, delta) if random else None
    kept = _magnitude_kept(ctx, params, i, delta) if not random else _random_kept(ctx, params, i, delta, probability)
    if kept is None:
        kept = delta * _mask(ctx, params, i, delta, probability)
    if not params.rescale:
        return kept
    if params.rescale_method == "l1":
        return kept * ctx.stats["l1_ratio"][i]
    if random:  # divide survivors by their keep probability (0 never survives, so never divides)
        return divide_(kept, probability)
    return divide_(kept, params.density(i))

