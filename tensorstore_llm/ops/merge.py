"""Merge methods as ops (anchor: mergekit — same method names, parameters and defaults).

Notation: base θ0, models θi, task vectors τi = θi − θ0, weights wi.

- task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"): θ0 + λ Σ wi τi.
- TIES (Yadav et al. 2023, "TIES-Merging"): keep the top density-fraction of |τi|, elect a sign
  per parameter from Σ wi τ̂i (ties to +), keep agreeing entries, divide by the agreeing weights.
- DARE (Yu et al. 2024, "Language Models are Super Mario"): keep each entry with probability
  density, rescale the survivors; then linear or TIES election. Rescaling by default divides by
  the keep probability, as the paper does (unbiased, no extra pass); ``rescale_method: l1``
  restores each task vector's L1 norm as mergekit does (one more pass over the tensor).
- Model Breadcrumbs (Davari & Belilovsky 2024): drop the largest gamma-fraction and the smallest
  entries so that density remains.
- DELLA (Deep et al. 2024): keep probabilities rise with the magnitude rank within each row,
  from density − ε to density + ε; survivors are divided by their own keep probability (the
  paper's rescaling) unless ``rescale_method: l1``. A row is the last axis of a tensor of two or
  more dims (always whole inside a block) and the whole tensor for a 1-D tensor (as mergekit),
  ranked in a statistics pass, so the ranks never depend on the block size or the device's tile.
  Tied magnitudes rank by position (stable sorts), the same everywhere.
All five are one kernel with flags, as in mergekit; ``PRESETS`` holds each method's flags and
defaults. Thresholds are exact (``select.py``): an entry's fate depends on its magnitude only,
entries equal to a threshold count as the larger group (so TIES may keep a few more than
density × n entries when magnitudes tie). Random masks come from ``ctx.uniform`` (seeded per
tensor, model and row group), never a global RNG.
- SLERP (Shoemake 1985, as used by mergekit): per tensor, on the flattened vectors; linear when
  |cos| > dot_threshold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RecipeError
from . import select
from .exact import divide_
from .registry import StatsPass, op

SPARSIFICATIONS = ("none", "magnitude", "random", "magnitude_outliers", "della")
CONSENSUS = ("none", "sum", "count")
RESCALE_METHODS = ("l1", "inverse")
ARITHMETIC = ("fp32", "mergekit")

PRESETS = {  # method -> (sparsification, consensus, normalize default, rescale default)
    "task_arithmetic": ("none", "none", False, False),
    "ties": ("magnitude", "sum", True, False),
    "dare_linear": ("random", "none", False, True),
    "dare_ties": ("random", "sum", False, True),
    "breadcrumbs": ("magnitude_outliers", "none", False, False),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", False, False),
    "della": ("della", "sum", True, True),
    "della_linear": ("della", "none", False, True),
}


@dataclass(frozen=True)
class TaskArithmeticParams:
    weights: tuple[float, ...]
    densities: tuple[float, ...] = ()
    sparsification: str = "none"
    consensus: str = "none"
    normalize: bool = False
    rescale: bool = False
    rescale_method: str = "inverse"  # inverse: / keep probability (papers); l1: restore each τi's L1 norm (mergekit)
    lam: float = 1.0
    gammas: tuple[float, ...] = ()   # breadcrumbs: fraction of largest entries dropped (default 0.01)
    epsilons: tuple[float, ...] = field(default=())  # della: probability spread (default 0.15)
    arithmetic: str = "fp32"         # "mergekit": replay mergekit's operations in the inputs' dtype
    # della: rank a 1-D tensor's magnitudes over the whole tensor in a statistics pass. The
    # planner turns it off for tensors of two or more dims (ranked per row, no pass needed).
    rank_pass: bool = True

    def __post_init__(self):
        for name, value, allowed in (("sparsification", self.sparsification, SPARSIFICATIONS),
                                     ("consensus", self.consensus, CONSENSUS),
                                     ("rescale_method", self.rescale_method, RESCALE_METHODS),
                                     ("arithmetic", self.arithmetic, ARITHMETIC)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name, values in (("weights", self.weights), ("lambda", (self.lam,))):
            if any(not math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be finite numbers, got {values}")
        if any(not 0 <= d <= 1 for d in self.densities):
            raise ValueError(f"densities must be in [0, 1], got {self.densities}")
        if any(not 0 <= g <= 1 for g in self.gammas):
            raise ValueError(f"gammas (breadcrumbs' fraction of largest entries dropped) must be in [0, 1], got {self.gammas}")
        if any(not 0 <= e < 0.5 for e in self.epsilons):
            raise ValueError(f"epsilons (DELLA's probability spread) must be in [0, 0.5), got {self.epsilons}")
        for i in range(len(self.weights)):
            if self.sparsification == "della" and 0 < self.density(i) < 1:
                if not (0 < self.density(i) - self.epsilon(i) and self.density(i) + self.epsilon(i) < 1):
                    raise ValueError(f"model {i}: epsilon must keep density ± epsilon inside (0, 1)")

    def validate_inputs(self, counts: dict[str, int]) -> None:
        n = counts["models"]
        for name in ("weights", "densities", "gammas", "epsilons"):
            values = getattr(self, name)
            optional_and_absent = name != "weights" and not values
            if not optional_and_absent and len(values) != n:
                raise ValueError(f"{n} models but {len(values)} {name}")

    def density(self, i: int) -> float:
        return self.densities[i] if self.densities else 1.0

    def gamma(self, i: int) -> float:
        return self.gammas[i] if self.gammas else 0.01

    def epsilon(self, i: int) -> float:
        return self.epsilons[i] if self.epsilons else 0.15

    def sparsifies(self, i: int) -> bool:
        return self.sparsification != "none" and self.density(i) < 1


# -- statistics passes -------------------------------------------------------------------------

def _ranks_wanted(params: TaskArithmeticParams, i: int, numel: int) -> list[int]:
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
    thresholds = {}
    for i, entries in ctx.stats["bins"].items():
        values = []
        for j, (k, high, above) in enumerate(entries):
            if k <= 0:
                values.append(math.inf)  # nothing is this large: no upper cut
                continue
            low, _ = select.bin_of_kth_largest(sum(p[(i, j)] for p in partials), k - above)
            values.append(select.threshold_value(high, low))
        thresholds[i] = values
    return {"thresholds": thresholds}


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


def _passes(params: TaskArithmeticParams):
    passes = []
    if params.sparsification == "della" and params.rank_pass and any(params.sparsifies(i) for i in range(len(params.weights))):
        passes.append(StatsPass(_rank_map, _rank_reduce))   # first: the L1 pass below needs the ranks
    if params.sparsification in ("magnitude", "magnitude_outliers") and any(params.sparsifies(i) for i in range(len(params.weights))):
        passes += [StatsPass(_hi_map, _hi_reduce, _add_histograms), StatsPass(_lo_map, _lo_reduce, _add_histograms)]
    if params.rescale and params.rescale_method == "l1" and any(params.sparsifies(i) for i in range(len(params.weights))):
        passes.append(StatsPass(_l1_map, _l1_reduce))
    return tuple(passes)


# -- the kernel --------------------------------------------------------------------------------

def _keep_probability(ctx, params: TaskArithmeticParams, i: int, delta: torch.Tensor):
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
        # stable sorts: tied magnitudes rank by position, the same on every device
        ranks = rows.argsort(dim=1, stable=True).argsort(dim=1, stable=True).to(torch.float32)  # 0 .. cols-1
        spread = max(rows.shape[1] - 1, 1)
    return divide_(ranks, spread).mul_(2 * params.epsilon(i)).add_(density - params.epsilon(i)).reshape(delta.shape)


def _whole_tensor_ranks(ctx, params: TaskArithmeticParams, i: int, delta: torch.Tensor) -> torch.Tensor:
    """Ranks of this tile's entries among the whole 1-D tensor's magnitudes (fp32, 0 .. n-1)."""
    found = (ctx.stats or {}).get("ranks", {}).get(i)
    if found is not None:
        return found[ctx.start:ctx.stop]
    if ctx.start == 0 and ctx.stop == ctx.shape[0]:   # the tile is the whole tensor: rank it here
        return delta.abs().argsort(stable=True).argsort(stable=True).to(torch.float32)
    raise RecipeError(f"della on 1-D tensor {ctx.output!r} split into row blocks needs its rank pass "
                      f"(TaskArithmeticParams.rank_pass=True)")


def _mask(ctx, params: TaskArithmeticParams, i: int, delta: torch.Tensor, probability=None) -> torch.Tensor:
    """Which entries of τi survive sparsification (a bool tensor shaped like ``delta``)."""
    if params.density(i) <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    if params.sparsification == "magnitude":
        return delta.abs() >= ctx.stats["thresholds"][i][0]
    if params.sparsification == "magnitude_outliers":
        upper, lower = ctx.stats["thresholds"][i]
        magnitude = delta.abs()
        return (magnitude >= lower) & (magnitude < upper)
    if probability is None:
        probability = _keep_probability(ctx, params, i, delta)
    return ctx.uniform(f"model{i}").reshape(delta.shape) < probability


def _magnitude_kept(ctx, params: TaskArithmeticParams, i: int, delta: torch.Tensor):
    """``delta * _mask(...)`` for the magnitude methods on fp32, in one or two ``hardshrink``s
    (no boolean mask: 5x faster on CPU, same values); None where that does not apply."""
    if delta.dtype != torch.float32 or params.density(i) <= 0:
        return None
    if params.sparsification == "magnitude":
        lower, upper = ctx.stats["thresholds"][i][0], math.inf
    elif params.sparsification == "magnitude_outliers":
        upper, lower = ctx.stats["thresholds"][i]
    else:
        return None
    # hardshrink keeps |x| > λ; with λ the fp32 value just below the threshold, that is |x| >= it
    kept = F.hardshrink(delta, _fp32_below(lower)) if lower > 0 else delta.clone()
    if upper != math.inf:
        kept -= F.hardshrink(kept, _fp32_below(upper))   # drop |x| >= upper: x - x = 0 exactly
    return kept


def _random_kept(ctx, params: TaskArithmeticParams, i: int, delta: torch.Tensor, probability):
    """``delta * _mask(...)`` for DARE / DELLA on fp32: sign(p - u) clamped at 0 is 1 exactly
    where u < p, and a float multiply is 2.5x faster than one by a boolean mask."""
    if delta.dtype != torch.float32 or params.density(i) <= 0:
        return None
    uniform = ctx.uniform(f"model{i}").reshape(delta.shape)
    return delta * uniform.neg_().add_(probability).sign_().clamp_min_(0)


def _fp32_below(value: float) -> float:
    return float(np.nextafter(np.float32(value), np.float32(-np.inf)))


def _sparsify(ctx, params: TaskArithmeticParams, i: int, delta: torch.Tensor) -> torch.Tensor:
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


@op("task_arithmetic", inputs=("base", "models*"), params=TaskArithmeticParams, random=True,
    temps=lambda n: n + 4, passes=_passes)
def task_arithmetic(ctx, params, base, models):
    """θ0 + λ · combine_i(wi · sparsify(θi − θ0)): task arithmetic, TIES, DARE, breadcrumbs, DELLA."""
    if params.arithmetic == "mergekit":
        return _mergekit_task_arithmetic(ctx, params, base, list(models))
    if params.consensus == "none":  # one running sum: one delta alive at a time
        mixed = None
        for i, m in enumerate(models):
            weighted = _sparsify(ctx, params, i, m - base).mul_(params.weights[i])
            mixed = weighted if mixed is None else mixed.add_(weighted)
        divisor = sum(params.weights)
        divisor = divisor if abs(divisor) >= 1e-8 else 1.0
    else:
        weighted = [_sparsify(ctx, params, i, m - base).mul_(params.weights[i]) for i, m in enumerate(models)]
        if params.consensus == "sum":
            votes = weighted[0].clone()
            for w in weighted[1:]:
                votes += w
        else:
            votes = sum(torch.sign(w) for w in weighted)
        majority = torch.ones_like(votes).copysign_(votes)   # ±1; a vote of +0 elects +
        del votes
        # Arithmetic instead of boolean masks (4x faster on CPU, same values): w·majority > 0
        # exactly where w agrees, so clamp(w·majority, 0) is |w| there and 0 elsewhere.
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for w, weight in zip(weighted, params.weights):
            agreeing = w.mul_(majority).clamp_min_(0)
            mixed += agreeing
            divisor += agreeing.sign_().mul_(weight)
        mixed.mul_(majority)
        if min(params.weights) > 0:   # then divisor is 0 or >= the smallest weight, and 0 only where mixed is 0
            divisor.clamp_min_(min(params.weights) / 2)
        else:
            divisor = torch.where(divisor == 0, 1.0, divisor)
    if params.normalize:
        mixed = divide_(mixed, divisor)
    if params.lam != 1:
        mixed = mixed.mul_(params.lam)
    return mixed.add_(base)


def _mergekit_task_arithmetic(ctx, params, base, models):
    """mergekit 0.1.5's generalized task arithmetic replayed op for op in the inputs' dtype
    (``GeneralizedTaskArithmeticMerge.merge_group`` and ``get_mask``), so that a bf16 merge
    rounds exactly where mergekit's does: for bit-exact comparisons. Sparsification masks stay
    ours (exact magnitude thresholds, seeded draws); the L1 rescale ratio is computed in fp64.
    """
    deltas = base.new_empty((len(models), *base.shape))
    for i, m in enumerate(models):
        deltas[i] = _sparsify(ctx, params, i, m - base)
    weights = torch.tensor(params.weights, dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    if params.consensus != "none":
        sign = deltas.sign()
        votes = deltas.sum(dim=0) if params.consensus == "sum" else sign.sum(dim=0)
        majority = (votes >= 0).to(base.dtype) * 2 - 1
        mask = sign == majority
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if params.normalize:
        mixed /= divisor
    if params.lam != 1:
        mixed *= params.lam
    return base + mixed


# -- SLERP -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SlerpParams:
    t: float
    dot_threshold: float = 0.9995
    eps: float = 1e-8

    def __post_init__(self):
        if not 0 <= self.t <= 1:
            raise ValueError(f"t must be in [0, 1], got {self.t}")
        if not (math.isfinite(self.dot_threshold) and math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"dot_threshold and eps must be finite (eps >= 0), got {self.dot_threshold}, {self.eps}")


def row_dots(x, y, rows):
    """Per-row sums of x*y: fp32 products accumulated in fp64 (per row, so blocking-independent)."""
    return (x.reshape(rows, -1) * y.reshape(rows, -1)).sum(1, dtype=torch.float64)


def _slerp_map(ctx, params, a, b):
    rows = max(1, ctx.stop - ctx.start) if ctx.shape else 1
    return {"aa": row_dots(a, a, rows), "bb": row_dots(b, b, rows), "ab": row_dots(a, b, rows)}


def sum_row_partials(partials: list[dict]) -> dict:
    """Each key's per-row partials, in row order, summed to one float (the same for any blocking)."""
    return {k: torch.cat([p[k] for p in partials]).sum().item() for k in partials[0]}


def _slerp_reduce(params, partials, ctx):
    return sum_row_partials(partials)


def slerp_coefficients(t: float, aa: float, bb: float, ab: float, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """(c_a, c_b) with slerp(a, b) = c_a·a + c_b·b, from |a|², |b|² and a·b (float64)."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = max(-1.0, min(1.0, ab / (na * nb)))
    if abs(dot) > dot_threshold:
        return 1 - t, t
    theta = math.acos(dot)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


@op("slerp", inputs=("a", "b"), params=SlerpParams, temps=3, passes=(StatsPass(_slerp_map, _slerp_reduce),))
def slerp(ctx, params, a, b):
    """Spherical interpolation from a (t=0) to b (t=1) on the tensor's flattened vectors."""
    s = ctx.stats
    c_a, c_b = slerp_coefficients(params.t, s["aa"], s["bb"], s["ab"], params.dot_threshold, params.eps)
    return a * c_a + b * c_b
