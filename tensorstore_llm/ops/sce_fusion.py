"""SCE and Arcee Fusion, streamed: their whole-tensor quantities are statistics passes (exact
order statistics by radix select, per-row fp64 sums), then the kernel runs on row tiles.

- ``sce`` (SCE: Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990):
  Select the top ``select_topk`` fraction of entries by the variance of the τi = θi − θ0 across
  models (k = count of nonzero variances · select_topk as an fp32 product, as mergekit, which can
  exceed the exact floor by one above 2^24 entries), Calculate per-model weights
  mean(τi²) / Σj mean(τj²), Erase entries whose sign disagrees with the sign of Σi τi; the result
  is θ0 + Σ wi' τi / max(Σ wi', 1e-6) over the kept entries. Passes: the variance's k-th largest
  value (two histograms of its bits, ``select.py``) and, where several entries tie at it, the
  tied entries per row (the first ones in flat order are kept, as ``topk.py`` keeps TIES's);
  then per-row fp64 sums of each masked τi², so mean(τi²) is the correctly rounded mean in the
  compute dtype, whatever the blocking (for bf16 that is mergekit's value: torch rounds its fp32
  sum / n once).
- ``arcee_fusion`` (Arcee Fusion, arcee.ai 2025): importance |θ1 − θ0| · KL(softmax(θ1) ||
  softmax(θ0)) per row (softmax over the last axis, + 1e-8), threshold median + 1.5·IQR of the
  importances (quantile q is the sorted value at index ⌊q·(n − 1)⌋, the index an fp32 product
  as mergekit's; exact here, where mergekit samples 10⁶ entries with replacement above that
  size), θ0 + (θ1 − θ0)·[importance >= threshold]. Passes: for a 1-D tensor (one softmax over
  all of it) the KL of the whole tensor from its gathered tiles; then two histograms of the
  importances' order-preserving bit keys for the three order statistics.

Both kernels are dtype-generic with mergekit's order of operations, so with ``--arithmetic
mergekit`` (compute dtype = the recipe's ``dtype``) they are their own bf16 replay.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import OpError
from . import select
from .registry import StatsPass, op
from .topk import within_top

# within_top: whether each entry of a tile is among the exact top k, ties by flat index (TIES's rule)

QUANTILES = (0.25, 0.5, 0.75)
_KEY_BINS = 1 << 16


def _rows(ctx) -> int:
    return max(1, ctx.stop - ctx.start) if ctx.shape else 1


def _add(a: dict, b: dict) -> dict:
    return {key: a[key] + b[key] for key in a}


# -- SCE ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SceParams:
    """``select_topk``: the fraction of entries kept by variance; ``int8_mask`` only changes the
    dtype of mergekit's masks (not the result) and is accepted for that."""

    select_topk: float = 1.0
    int8_mask: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.select_topk) and 0 <= self.select_topk <= 1):
            raise ValueError(f"select_topk must be in [0, 1], got {self.select_topk}")


def top_by_value(values: torch.Tensor, k: int) -> torch.Tensor:
    """A mask of the k largest entries of ``values`` (whole, in memory); equal values by flat
    index, lowest first. The streamed passes below select the same set."""
    flat = values.reshape(-1)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=values.device)
    if k > 0:
        order = torch.sort(flat, descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask.reshape(values.shape)


def _task_vectors(base, models):
    """[n, *tile] τi = θi − θ0 in the compute dtype."""
    taus = base.new_empty((len(models), *base.shape))
    for i, m in enumerate(models):
        torch.sub(m, base, out=taus[i])
    return taus


def _variance(taus):
    """torch.var(taus, dim=0, unbiased=False), bit for bit as torch computes it on a CPU (Welford's
    update in float64, rounded once to the dtype) but 3x faster: torch's reduction over the
    leading axis of a row tile took ~0.5 s per 2^19 entries."""
    mean = torch.zeros(taus.shape[1:], dtype=torch.float64, device=taus.device)
    m2 = torch.zeros_like(mean)
    for k in range(taus.shape[0]):
        x = taus[k].to(torch.float64)
        delta = x - mean
        mean.add_(delta / (k + 1))
        m2.add_(delta.mul_(x.sub_(mean)))
    return m2.div_(taus.shape[0]).to(taus.dtype)


def _var_high_map(ctx, params, base, models):
    variance = _variance(_task_vectors(base, models))
    return {"high": select.high_histogram(variance), "nonzero": torch.count_nonzero(variance).reshape(1)}


def _var_high_reduce(params, partials, ctx):
    nonzero = torch.cat([p["nonzero"] for p in partials]).sum()
    k = int(nonzero * params.select_topk)            # as mergekit: an int64 tensor times a float is fp32
    if k <= 0:
        return {"sce_k": 0}
    histogram = sum(p["high"] for p in partials)
    return {"sce_k": k, "sce_bin": select.bin_of_kth_largest(histogram, k)}


def _var_low_map(ctx, params, base, models):
    if not ctx.stats["sce_k"]:
        return {}
    return {"low": select.low_histogram(_variance(_task_vectors(base, models)), ctx.stats["sce_bin"][0])}


def _var_low_reduce(params, partials, ctx):
    """The k-th largest variance and (tied entries inside the k, entries equal to it), in the
    layout ``topk.within_top`` reads (model 0, cut 0)."""
    k = ctx.stats["sce_k"]
    if not k:
        return {}
    high, above = ctx.stats["sce_bin"]
    histogram = sum(p["low"] for p in partials)
    low, above_in_bin = select.bin_of_kth_largest(histogram, k - above)
    return {"thresholds": {0: [select.threshold_value(high, low)]},
            "ties": {0: [(k - above - above_in_bin, int(histogram[low]))]}}


def _tie_cut(ctx) -> bool:
    needed, tied = ctx.stats["ties"][0][0] if ctx.stats.get("sce_k") else (0, 0)
    return 0 < needed < tied


def _var_tie_map(ctx, params, base, models):
    if not _tie_cut(ctx):
        return {}
    equal = _variance(_task_vectors(base, models)).reshape(_rows(ctx), -1) == ctx.stats["thresholds"][0][0]
    return {"equal": equal.sum(1, dtype=torch.int32).to(torch.int64)}


def _var_tie_reduce(params, partials, ctx):
    if not _tie_cut(ctx):
        return {}
    per_row = torch.cat([p["equal"].cpu() for p in partials])
    return {"tie_before": {(0, 0): F.pad(per_row.cumsum(0), (1, 0))}}


def _selected(ctx, params, taus):
    """τ with the entries outside the variance top-k multiplied by 0 (mergekit multiplies by a
    0/1 mask in the compute dtype); ``taus`` itself when every entry is kept."""
    if params.select_topk >= 1:
        return taus
    if not ctx.stats["sce_k"]:
        return taus.mul_(torch.zeros((), dtype=taus.dtype, device=taus.device))
    keep = within_top(ctx, 0, 0, _variance(taus))
    return taus.mul_(keep.to(taus.dtype))


def _energy_map(ctx, params, base, models):
    taus = _selected(ctx, params, _task_vectors(base, models))
    squares = taus.square().reshape(len(models), _rows(ctx), -1)      # rounded to the compute dtype, as mergekit's
    return {"energy": squares.sum(2, dtype=torch.float64).T.contiguous()}   # [rows, n]


def _energy_reduce(params, partials, ctx):
    total = torch.cat([p["energy"] for p in partials]).sum(0)
    return {"mean_square": (total / math.prod(ctx.shape)).tolist()}


def _sce_passes(params):
    passes = []
    if params.select_topk < 1:
        passes += [StatsPass(_var_high_map, _var_high_reduce, _add), StatsPass(_var_low_map, _var_low_reduce, _add),
                   StatsPass(_var_tie_map, _var_tie_reduce)]
    return (*passes, StatsPass(_energy_map, _energy_reduce))


def sce_weights(mean_square: list[float], dtype) -> torch.Tensor:
    """SCE's per-model weights from the fp64 means of τi² in ``dtype``: mean(τi²) / Σ mean(τj²),
    uniform when that sum is below 1e-6 (mergekit's operations on the small vector)."""
    energy = torch.tensor(mean_square, dtype=torch.float64).to(dtype)
    energy_sum = torch.sum(energy).item()
    return torch.ones_like(energy) / len(mean_square) if abs(energy_sum) < 1e-6 else energy / energy_sum


@op("sce", inputs=("base", "models*"), params=SceParams, temps=lambda n: 3 * n + 11, passes=_sce_passes)
def sce(ctx, params, base, models):
    """SCE: variance-selected, sign-erased, energy-weighted mean of the task vectors (per tile,
    from the passes' threshold and weights)."""
    taus = _selected(ctx, params, _task_vectors(base, list(models)))
    majority = (taus.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
    keep = taus.sign() == majority
    del majority
    weights = sce_weights(ctx.stats["mean_square"], base.dtype).to(base.device)
    kept_weights = weights.reshape(-1, *([1] * (taus.dim() - 1))) * keep
    del keep
    denominator = torch.sum(kept_weights, dim=0).clamp(min=1e-6)
    merged = taus.mul_(kept_weights).sum(dim=0)
    del taus, kept_weights
    return merged.div_(denominator).add_(base)


# -- Arcee Fusion ------------------------------------------------------------------------------

def _kl_rows(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(θ1) || softmax(θ0)) over the last axis (+ 1e-8 each), keepdim."""
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def fusion_importance(model: torch.Tensor, base: torch.Tensor, kl: torch.Tensor | None = None) -> torch.Tensor:
    """|θ1 − θ0| times the per-row KL divergence of softmax(θ1) from softmax(θ0); ``kl`` given:
    that divergence (a 1-D tensor's, computed over all of it)."""
    return (model - base).abs() * (_kl_rows(model, base) if kl is None else kl)


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """median + 1.5 · (q3 − q1) of a whole tensor in memory, quantile q being the sorted value at
    ⌊q · (n − 1)⌋ (the streamed passes find the same values)."""
    ordered = torch.sort(importance.reshape(-1)).values
    q1, median, q3 = ordered[_quantile_ranks(ordered.numel())]
    return median + 1.5 * (q3 - q1)


def _quantile_ranks(numel: int) -> torch.Tensor:
    return (torch.tensor(QUANTILES) * (numel - 1)).long()     # an fp32 product, as mergekit's


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2^32) ordered like the fp32 values of ``x`` (−0 counted as +0)."""
    bits = (x.reshape(-1).to(torch.float32) + 0.0).view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) + (1 << 31)


def key_value(key: int) -> float:
    """The fp32 value whose ``order_keys`` key is ``key``."""
    signed = torch.tensor([key - (1 << 31)], dtype=torch.int32)
    return (signed ^ ((signed >> 31) & 0x7FFFFFFF)).view(torch.float32).item()


def _importance_of(ctx, base, model):
    """The importance of this tile's entries; a 1-D tensor's KL spans the whole tensor (from the
    gather pass, or from the tile when the tile is the whole tensor)."""
    if len(ctx.shape) != 1:
        return fusion_importance(model, base)
    kl = (ctx.stats or {}).get("kl")
    if kl is None:
        if ctx.start != 0 or ctx.stop != ctx.shape[0]:
            raise OpError(f"arcee_fusion on 1-D tensor {ctx.output!r}: rows {ctx.start}:{ctx.stop} without the "
                          f"whole tensor's KL (plan it with whole_tensor_kl=True)")
        return fusion_importance(model, base)
    return fusion_importance(model, base, kl.to(base.device))


def _gather_map(ctx, params, base, model):
    """A 1-D tensor's tiles, kept for its one softmax (1-D tensors are norms and biases: small)."""
    return {"base": base, "model": model} if len(ctx.shape) == 1 else {}


def _gather_reduce(params, partials, ctx):
    if len(ctx.shape) != 1:
        return {}
    base = torch.cat([p["base"] for p in partials])
    model = torch.cat([p["model"] for p in partials])
    return {"kl": _kl_rows(model, base)}


def _key_high_map(ctx, params, base, model):
    keys = order_keys(_importance_of(ctx, base, model))
    return {"high": torch.bincount(keys >> 16, minlength=_KEY_BINS)}


def _key_high_reduce(params, partials, ctx):
    """For each quantile rank: (high 16 bits of its key, its rank among the entries of that bin)."""
    below = F.pad(sum(p["high"] for p in partials).cumsum(0), (1, 0))       # entries in bins < b
    found = []
    for rank in _quantile_ranks(math.prod(ctx.shape)).tolist():
        high = int(torch.searchsorted(below, torch.tensor(rank), right=True)) - 1
        found.append((high, rank - int(below[high])))
    return {"quantile_bins": found}


def _key_low_map(ctx, params, base, model):
    keys = order_keys(_importance_of(ctx, base, model))
    high = keys >> 16
    return {b: torch.bincount(keys[high == b] & 0xFFFF, minlength=_KEY_BINS) for b in {h for h, _ in ctx.stats["quantile_bins"]}}


def _key_low_reduce(params, partials, ctx):
    """The three quantile values (fp32 floats, exact values of the compute dtype)."""
    values = []
    for high, rank in ctx.stats["quantile_bins"]:
        below = F.pad(sum(p[high] for p in partials).cumsum(0), (1, 0))
        low = int(torch.searchsorted(below, torch.tensor(rank), right=True)) - 1
        values.append(key_value((high << 16) | low))
    return {"quantiles": values}


@dataclass(frozen=True)
class FusionParams:
    """No recipe parameters. ``whole_tensor_kl``: the tensor is 1-D, so its one softmax spans every
    entry and a pass gathers it first (the merge planner sets it from the tensor's shape)."""

    whole_tensor_kl: bool = False


def _fusion_passes(params):
    """The 1-D gather where asked, then the two histograms of the importance keys."""
    keys = (StatsPass(_key_high_map, _key_high_reduce, _add), StatsPass(_key_low_map, _key_low_reduce, _add))
    return ((StatsPass(_gather_map, _gather_reduce),) if params is not None and params.whole_tensor_kl else ()) + keys


def fusion_threshold_of(quantiles: list[float], dtype) -> torch.Tensor:
    """median + 1.5 · (q3 − q1) in ``dtype`` from the three quantile values (mergekit's order)."""
    q1, median, q3 = torch.tensor(quantiles, dtype=torch.float32).to(dtype)
    return median + 1.5 * (q3 - q1)


@op("arcee_fusion", inputs=("base", "model"), params=FusionParams, temps=10, passes=_fusion_passes)
def arcee_fusion(ctx, params, base, model):
    """θ0 + (θ1 − θ0) where the entry's importance reaches the tensor's outlier threshold."""
    importance = _importance_of(ctx, base, model)
    threshold = fusion_threshold_of(ctx.stats["quantiles"], importance.dtype).to(importance.device)
    mask = (importance >= threshold).float()
    return base + (model - base) * mask


__all__ = [
    "FusionParams",
    "SceParams",
    "arcee_fusion",
    "fusion_importance",
    "fusion_threshold",
    "fusion_threshold_of",
    "key_value",
    "order_keys",
    "sce",
    "sce_weights",
    "top_by_value",
]
