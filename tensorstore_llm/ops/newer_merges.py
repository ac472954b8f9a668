"""Kernels of mergekit's newer merge methods, written from their formulas (mergekit 0.1.5 is the
reference for meaning, parameter names and defaults; no code is taken from it).

Notation: base θ0, models θi, task vectors τi = θi − θ0 (or xi = θi when there is no base),
weights wi. Kernels that mergekit computes in the merge dtype are written dtype-generic with the
same order of operations, so that with ``--arithmetic mergekit`` (compute dtype = the recipe's
``dtype``) they are their own bit-exact replay; by default they compute in fp32.

- ``multislerp`` / ``multislerp_delta`` (Multi-SLERP, C. Goddard 2025, "multislerp: wow what a
  cool idea"): barycentric interpolation on the hypersphere — unit vectors ui = xi / (|xi| + ε),
  their weighted mean direction m = Σ wi ui / |Σ wi ui|, the weighted tangent vectors at m mapped
  back by the exponential map, scaled by Σ wi |xi|; per tensor on the flattened vectors. Every
  step is a linear combination of the xi, so the coefficients come from the Gram matrix (a
  statistics pass, fp64) and the output streams by rows.
- ``karcher`` (the weighted Karcher / Fréchet mean on the unit sphere, Karcher 1977; as in
  arXiv 2603.04972): fixed-point iteration m ← exp_m(Σ αi θi / sin θi · (ui − cos θi m)) from the
  normalised mean of the unit vectors, at most ``max_iter`` times, until the step is below
  ``tol``; inputs with norm <= tol are left out of the mean; the result is (Σ αi |xi|) m with
  αi = 1/N. Also from the Gram matrix.
- ``nearswap`` (NearSwap, alchemonaut 2024, "QuartetAnemoi-70B-t0.0001"): per entry
  w = clamp(t / max(|θ0 − θ1|, 1e-6), 0, 1), result w·θ1 + (1 − w)·θ0: entries where the two
  models are within t of each other take the second model's value. Element-wise.
- ``ram`` / ``ramplus_tl`` (RAM: Reinforced Agent Merging, arXiv 2601.13572): entries where
  |τi| > ε count as contributed; an entry one model contributes is kept as is, one that several
  contribute is their mean. RAM+ (tensor-local) scales model i's unique entries by
  λi = 1 + r·clamp(ρi, 0, α), ρi = (its shared entries) / max(its unique entries, ε), counted
  over the tensor (a statistics pass of integer counts).

``sce`` and ``arcee_fusion`` (whole-tensor selections made streamable by exact order statistics)
are in ``sce_fusion.py``, registered from here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .geometry import row_dots, sum_row_partials
from .registry import StatsPass, op
from .sce_fusion import FusionParams, SceParams, arcee_fusion, sce  # noqa: F401  (registers these two ops)


def _finite(*values) -> bool:
    return all(math.isfinite(v) for v in values)


def _vectors(models, base):
    return list(models) if base is None else [m - base for m in models]


def _gram_map(ctx, params, models, base=None):
    """Per-row partial dot products of every pair of (task) vectors (fp64 sums of fp32 products)."""
    rows = max(1, ctx.stop - ctx.start) if ctx.shape else 1
    xs = _vectors(models, base)
    return {(i, j): row_dots(xs[i], xs[j], rows) for i in range(len(xs)) for j in range(i, len(xs))}


def _gram(partials) -> list[list[float]]:
    total = sum_row_partials(partials)
    n = max(i for i, _ in total) + 1
    return [[total[(min(i, j), max(i, j))] for j in range(n)] for i in range(n)]


def _quad(g, a, b) -> float:
    """aᵀ G b."""
    return sum(a[i] * g[i][j] * b[j] for i in range(len(a)) for j in range(len(b)) if a[i] and b[j])


def _combine(coefficients, models, base=None):
    """Σ ci xi (xi = θi, or θi − θ0 with a base, then + θ0), one running sum."""
    total = None
    for c, m in zip(coefficients, models):
        term = (m if base is None else m - base) * c
        total = term if total is None else total.add_(term)
    return total if base is None else total.add_(base)


# -- Multi-SLERP -------------------------------------------------------------------------------

@dataclass(frozen=True)
class MultiSlerpParams:
    """One weight per model; ``normalize_weights`` divides them by their sum; ``eps`` as mergekit."""

    weights: tuple[float, ...]
    normalize_weights: bool = True
    eps: float = 1e-8

    def __post_init__(self):
        if not self.weights or not _finite(*self.weights, self.eps) or self.eps < 0:
            raise ValueError(f"multislerp needs finite weights and eps >= 0, got {self.weights}, {self.eps}")
        if self.normalize_weights and sum(self.weights) == 0:
            raise ValueError("multislerp: the weights sum to 0 and cannot be normalised")

    def validate_inputs(self, counts: dict[str, int]) -> None:
        if counts.get("models", 0) != len(self.weights):
            raise ValueError(f"{counts.get('models', 0)} models but {len(self.weights)} weights")


def multislerp_coefficients(params: MultiSlerpParams, g, where: str = "tensor") -> list[float]:
    """(c_i) with multislerp(x) = Σ c_i x_i, from the Gram matrix ``g`` of the x_i (float64)."""
    n = len(g)
    total = sum(params.weights)
    w = [x / total for x in params.weights] if params.normalize_weights else list(params.weights)
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(n)]
    scale = [1 / (norms[i] + params.eps) for i in range(n)]
    u = [[g[i][j] * scale[i] * scale[j] for j in range(n)] for i in range(n)]     # Gram of the unit vectors
    mean_norm = math.sqrt(max(_quad(u, w, w), 0.0))
    if mean_norm < params.eps:
        if n == 2:
            return list(w)    # mergekit's fallback: the linear interpolation
        raise ValueError(f"{where}: multislerp's weighted sum of the unit vectors is zero (antipodal models with "
                         f"balancing weights); use other weights")
    mean = [x / mean_norm for x in w]                                             # m = Σ mean_k u_k
    dots = [sum(u[i][k] * mean[k] for k in range(n)) for i in range(n)]           # u_i · m
    spread = sum(w[i] * dots[i] for i in range(n))
    tangent = [w[k] - spread * mean[k] for k in range(n)]                        # Σ w_i (u_i − (u_i·m) m)
    tangent_norm = math.sqrt(max(_quad(u, tangent, tangent), 0.0)) + params.eps
    on_sphere = [mean[k] * math.cos(tangent_norm) + tangent[k] * (math.sin(tangent_norm) / tangent_norm)
                 for k in range(n)]
    avg_norm = sum(norms[i] * w[i] for i in range(n))
    return [avg_norm * on_sphere[k] * scale[k] for k in range(n)]


def _multislerp_reduce(params, partials, ctx):
    return {"c": multislerp_coefficients(params, _gram(partials), ctx.output)}


_MULTISLERP_PASSES = (StatsPass(_gram_map, _multislerp_reduce),)


@op("multislerp", inputs=("models*",), params=MultiSlerpParams, temps=lambda n: n + 3, passes=_MULTISLERP_PASSES)
def multislerp(ctx, params, models):
    """Multi-SLERP of the models' flattened tensors (no base)."""
    return _combine(ctx.stats["c"], models)


@op("multislerp_delta", inputs=("base", "models*"), params=MultiSlerpParams, temps=lambda n: n + 4,
    passes=_MULTISLERP_PASSES)
def multislerp_delta(ctx, params, base, models):
    """θ0 + Multi-SLERP of the task vectors."""
    return _combine(ctx.stats["c"], models, base)


# -- Karcher mean ------------------------------------------------------------------------------

@dataclass(frozen=True)
class KarcherParams:
    """Iteration limit and tolerance (mergekit's ``max_iter`` and ``tol``)."""

    max_iter: int = 10
    tol: float = 1e-5

    def __post_init__(self):
        if self.max_iter < 0 or not _finite(self.tol) or self.tol < 0:
            raise ValueError(f"karcher needs max_iter >= 0 and a finite tol >= 0, got {self.max_iter}, {self.tol}")


def karcher_coefficients(params: KarcherParams, g) -> list[float]:
    """(c_i) with karcher(x) = Σ c_i x_i, from the Gram matrix ``g`` of the x_i (float64)."""
    n, tol = len(g), params.tol
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    alpha = {i: 1 / len(valid) for i in valid}
    u = [[g[i][j] / (norms[i] * norms[j]) if i in alpha and j in alpha else 0.0 for j in range(n)] for i in range(n)]

    def norm_of(v):
        return math.sqrt(max(_quad(u, v, v), 0.0))
    mean = [alpha.get(i, 0.0) for i in range(n)]
    mean_norm = norm_of(mean)
    mean = [float(i == valid[0]) for i in range(n)] if mean_norm < tol else [x / mean_norm for x in mean]
    for _ in range(params.max_iter):
        tangent = [0.0] * n
        for i in valid:
            dot = max(-1.0, min(1.0, sum(u[i][k] * mean[k] for k in range(n))))
            theta = math.acos(dot)
            if theta < tol:
                continue
            step = alpha[i] * theta / math.sin(theta)
            tangent = [tangent[k] + step * (float(k == i) - dot * mean[k]) for k in range(n)]
        tangent_norm = norm_of(tangent)
        if tangent_norm < tol:
            break
        mean = [math.cos(tangent_norm) * mean[k] + math.sin(tangent_norm) * tangent[k] / tangent_norm for k in range(n)]
        unit_norm = norm_of(mean)
        if unit_norm > tol:
            mean = [x / unit_norm for x in mean]
    scale = sum(norms) / n            # Σ (1/N) |x_i| over every input, as mergekit
    return [scale * mean[i] / norms[i] if i in alpha else 0.0 for i in range(n)]


@op("karcher", inputs=("models*",), params=KarcherParams, temps=lambda n: n + 3,
    passes=(StatsPass(_gram_map, lambda params, partials, ctx: {"c": karcher_coefficients(params, _gram(partials))}),))
def karcher(ctx, params, models):
    """The Karcher mean of the models' flattened tensors on the sphere, scaled by their mean norm."""
    return _combine(ctx.stats["c"], models)


# -- NearSwap ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class NearSwapParams:
    t: float

    def __post_init__(self):
        if not (_finite(self.t) and self.t >= 0):
            raise ValueError(f"nearswap's t must be a finite number >= 0, got {self.t}")


@op("nearswap", inputs=("base", "model"), params=NearSwapParams, temps=4)
def nearswap(ctx, params, base, model):
    """w·θ1 + (1 − w)·θ0 with w = clamp(t / max(|θ0 − θ1|, 1e-6), 0, 1), entry by entry."""
    distance = torch.abs(base - model)
    weight = (params.t / distance.clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * model + (1 - weight) * base


# -- RAM and RAM+ ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RamParams:
    """``epsilon``: |τ| above it counts as a contribution; RAM+ adds ``r`` and ``alpha``."""

    epsilon: float = 1e-5
    r: float = 0.1
    alpha: float = 0.2

    def __post_init__(self):
        if not _finite(self.epsilon, self.r, self.alpha) or self.epsilon < 0:
            raise ValueError(f"ram needs finite epsilon >= 0, r and alpha, got {self.epsilon}, {self.r}, {self.alpha}")


def _contributions(params, base, models):
    taus = torch.stack([m - base for m in models], dim=0)
    contributed = taus.abs() > params.epsilon
    counts = contributed.sum(dim=0, keepdim=True)
    return taus, contributed, counts, counts > 1, counts == 1


def _ram_counts(ctx, params, base, models):
    _, contributed, _, shared, unique = _contributions(params, base, models)
    flat = contributed.reshape(len(models), -1)
    return {"shared": (flat & shared.reshape(1, -1)).sum(dim=1).cpu(), "unique": (flat & unique.reshape(1, -1)).sum(dim=1).cpu()}


def _ram_scales(params, partials, ctx):
    shared = torch.stack([p["shared"] for p in partials]).sum(dim=0)
    unique = torch.stack([p["unique"] for p in partials]).sum(dim=0)
    rho = shared / unique.clamp(min=params.epsilon)
    return {"lambda": (1 + params.r * rho.clamp(min=0, max=params.alpha)).tolist()}


def _ram_merge(params, base, models, scales=None):
    taus, contributed, counts, shared, unique = _contributions(params, base, models)
    kept = taus * contributed
    if scales is None:
        unique_part = kept * unique
    else:
        unique_part = kept * unique * torch.tensor(scales, dtype=torch.float32, device=base.device).reshape(-1, *([1] * base.dim()))
    merged = (unique_part + kept * shared / counts.clamp(min=1)).sum(dim=0)
    return base + merged


@op("ram", inputs=("base", "models*"), params=RamParams, temps=lambda n: 5 * n + 4)
def ram(ctx, params, base, models):
    """θ0 + per entry: the one contributing τi, or the mean of several (|τi| > epsilon)."""
    return _ram_merge(params, base, models)


@op("ramplus_tl", inputs=("base", "models*"), params=RamParams, temps=lambda n: 6 * n + 4,
    passes=(StatsPass(_ram_counts, _ram_scales, fold=lambda a, b: {k: a[k] + b[k] for k in a}),))
def ramplus_tl(ctx, params, base, models):
    """RAM with model i's unique entries scaled by λi = 1 + r·clamp(shared_i / unique_i, 0, alpha)."""
    return _ram_merge(params, base, models, ctx.stats["lambda"])
