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

Magnitude masks keep exactly the requested number of entries, ties broken by flat index, the
same under any blocking, resume or device: ``topk.py`` (its statistics passes and masks).
Random masks come from ``ctx.uniform`` under the stream name
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

from ..errors import RecipeError
from . import dare_mask, ties_fused, topk
from .exact import divide_
from .registry import StatsPass
from .topk import kept_counts  # noqa: F401  (re-exported: merge/recipe.py)

MASK_STREAM = "task_arithmetic"   # random masks are drawn as this op's, whichever op sparsifies
SPARSIFICATIONS = ("none", "magnitude", "random", "magnitude_outliers", "della")
RESCALE_METHODS = ("l1", "inverse")


# -- statistics passes -------------------------------------------------------------------------

def _deltas(base, models):
    return [m - base for m in models]


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


def warm_kernels(params) -> None:
    """Load the compiled loops ``params``' sparsification will run (exact top-k statistics,
    DARE's draw) before the run measures its starting RSS (``OpSpec.warm``)."""
    if params.sparsification in ("magnitude", "magnitude_outliers", "random") and any(
            params.sparsifies(i) for i in range(len(params.weights))):
        topk.topk_kernels.warm()
    if ties_fused.applies(params):
        ties_fused.warm(len(params.weights))


def sparsify_passes(params) -> tuple[StatsPass, ...]:
    """The statistics passes ``params``' sparsification needs before the kernel runs (magnitude
    thresholds, DELLA's 1-D ranks, L1 ratios), in the order they must run."""
    passes = []
    if params.sparsification == "della" and params.rank_pass and any(params.sparsifies(i) for i in range(len(params.weights))):
        passes.append(StatsPass(_rank_map, _rank_reduce))   # first: the L1 pass below needs the ranks
    if params.sparsification in ("magnitude", "magnitude_outliers") and any(params.sparsifies(i) for i in range(len(params.weights))):
        passes += [topk.StoredInputsPass(topk.high_map, topk.high_reduce, topk.add_histograms),
                   topk.StoredInputsPass(topk.low_map, topk.low_reduce, topk.add_histograms),
                   topk.StoredInputsPass(topk.tie_map, topk.tie_reduce)]
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
        return found[ctx.start:ctx.stop].clone()   # a copy: the caller scales it in place, the statistics serve every pass
    if ctx.start == 0 and ctx.stop == ctx.shape[0]:   # the tile is the whole tensor: rank it here
        return delta.abs().argsort(stable=True).argsort(stable=True).to(torch.float32)
    raise RecipeError(f"della on 1-D tensor {ctx.output!r} split into row blocks needs its rank pass "
                      f"(TaskArithmeticParams.rank_pass=True)")


def _mask(ctx, params, i: int, delta: torch.Tensor, probability=None) -> torch.Tensor:
    """Which entries of τi survive sparsification (a bool tensor shaped like ``delta``)."""
    if params.density(i) <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    if params.sparsification == "magnitude":
        return topk.within_top(ctx, i, 0, delta.abs())
    if params.sparsification == "magnitude_outliers":
        magnitude = delta.abs()
        return topk.within_top(ctx, i, 1, magnitude) & ~topk.within_top(ctx, i, 0, magnitude)
    if probability is None:
        probability = _keep_probability(ctx, params, i, delta)
    return _uniform(ctx, i).reshape(delta.shape) < probability


def _magnitude_kept(ctx, params, i: int, delta: torch.Tensor):
    """``delta * _mask(...)`` for the magnitude methods on fp32, in ``hardshrink``s (no boolean
    mask: 5x faster on CPU, same values, and the same temporaries with or without a tie-break);
    None where that does not apply."""
    if delta.dtype != torch.float32 or params.density(i) <= 0:
        return None
    if params.sparsification == "magnitude":
        return topk.top_kept(ctx, i, 0, delta)
    if params.sparsification == "magnitude_outliers":
        kept = topk.top_kept(ctx, i, 1, delta)
        if ctx.stats["thresholds"][i][0] != math.inf:
            kept -= topk.top_kept(ctx, i, 0, delta)   # within the top k1 but not the top k0: x - x = 0 exactly
        return kept
    return None


def _random_kept(ctx, params, i: int, delta: torch.Tensor, probability):
    """``delta * _mask(...)`` for DARE / DELLA on fp32: sign(p - u) clamped at 0 is 1 exactly
    where u < p, and a float multiply is 2.5x faster than one by a boolean mask."""
    if delta.dtype != torch.float32 or params.density(i) <= 0:
        return None
    if params.sparsification == "random":   # DARE: the draw and the mask in one compiled loop (same values)
        kept = dare_mask.dropped(ctx, f"{MASK_STREAM}/model{i}", delta, probability)
        if kept is not None:
            return kept
    uniform = _uniform(ctx, i).reshape(delta.shape)
    return delta * uniform.neg_().add_(probability).sign_().clamp_min_(0)


def _uniform(ctx, i: int) -> torch.Tensor:
    """Model i's uniform draws for this block, the same for every op that sparsifies."""
    return dataclasses.replace(ctx, op=MASK_STREAM).uniform(f"model{i}")


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

