"""Geometric merges: SLERP, Model Stock and NuSLERP (anchor: mergekit's implementations).

- SLERP (Shoemake 1985, as used by mergekit): per tensor, on the flattened vectors; linear when
  |cos| > dot_threshold.
- Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models"):
  per tensor, the mean pairwise cosine c of the task vectors τi = θi − θ0 (flattened) gives
  t = N·c / (1 + (N − 1)·c); the result is t·mean(θi) + (1 − t)·θ0, or θ0 when the denominator
  vanishes.
- NuSLERP (mergekit): spherical interpolation with t = w1 / (w0 + w1) (0.5 if the weights sum to
  0) of the two models' flattened tensors — or of their task vectors, added back to the base
  when a base model is given; linear only when the vectors are exactly colinear.

Norms and cosines come from statistics passes of per-row sums (fp32 products accumulated in
fp64), so any blocking agrees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .exact import divide_
from .registry import StatsPass, op

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


# -- Model Stock -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStockParams:
    eps: float = 1e-6
    filter_wise: bool = False   # one t per row (mergekit's filter_wise): only the whole-tensor op

    def __post_init__(self):
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps}")


def _pairs(n: int):
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def _stock_map(ctx, params, base, models):
    rows = max(1, ctx.stop - ctx.start) if ctx.shape else 1
    offsets = [m - base for m in models]
    out = {("sq", i): row_dots(o, o, rows) for i, o in enumerate(offsets)}
    for i, j in _pairs(len(offsets)):
        out[("dot", i, j)] = row_dots(offsets[i], offsets[j], rows)
    return out


def _stock_reduce(params, partials, ctx):
    total = sum_row_partials(partials)
    n = sum(1 for key in total if key[0] == "sq")
    cosines = []
    for i, j in _pairs(n):
        norm = max(math.sqrt(total[("sq", i)]) * math.sqrt(total[("sq", j)]), params.eps)
        cosines.append(max(-1.0, min(1.0, total[("dot", i, j)] / norm)))
    cos = sum(cosines) / len(cosines) if cosines else 1.0
    denominator = 1 + (n - 1) * cos
    return {"t": 0.0 if abs(denominator) < 1e-6 else n * cos / denominator}


@op("model_stock", inputs=("base", "models*"), params=ModelStockParams, temps=lambda n: n + 3,
    passes=(StatsPass(_stock_map, _stock_reduce),))
def model_stock(ctx, params, base, models):
    """t · mean(models) + (1 − t) · base, t from the mean pairwise cosine of the task vectors."""
    if params.filter_wise:
        raise ValueError("filter-wise Model Stock runs as op mergekit_model_stock (whole tensors)")
    t = ctx.stats["t"]
    total = None
    for m in models:
        total = m.clone() if total is None else total.add_(m)
    return divide_(total, len(models)).mul_(t).add_(base * (1 - t))


# -- NuSLERP -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class NuSlerpParams:
    weights: tuple[float, ...]
    eps: float = 1e-8

    def __post_init__(self):
        if any(not math.isfinite(w) for w in self.weights) or not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"weights must be finite numbers and eps >= 0, got {self.weights}, {self.eps}")

    def validate_inputs(self, counts: dict[str, int]) -> None:
        if counts.get("models", 0) != 2 or len(self.weights) != 2:
            raise ValueError("nuslerp merges exactly two models (besides an optional base), with one weight each")

    @property
    def t(self) -> float:
        total = sum(self.weights)
        return 0.5 if abs(total) < 1e-6 else self.weights[1] / total


def _vectors(base, models):
    a, b = models[0], models[1]
    return (a, b) if base is None else (a - base, b - base)


def _nuslerp_map(ctx, params, models, base=None):
    rows = max(1, ctx.stop - ctx.start) if ctx.shape else 1
    a, b = _vectors(base, models)
    return {"aa": row_dots(a, a, rows), "bb": row_dots(b, b, rows), "ab": row_dots(a, b, rows)}


def _nuslerp_coefficients(params, stats):
    # mergekit: linear only when 1 - cos^2 <= eps^2, i.e. (numerically) exactly colinear
    threshold = math.sqrt(max(0.0, 1 - params.eps ** 2))
    return slerp_coefficients(params.t, stats["aa"], stats["bb"], stats["ab"], threshold, 1e-7)


_NUSLERP_PASSES = (StatsPass(_nuslerp_map, lambda params, partials, ctx: sum_row_partials(partials)),)


@op("nuslerp", inputs=("models*",), params=NuSlerpParams, temps=4, passes=_NUSLERP_PASSES)
def nuslerp(ctx, params, models):
    """SLERP of two models' flattened tensors with t = w1 / (w0 + w1)."""
    c_a, c_b = _nuslerp_coefficients(params, ctx.stats)
    return models[0].mul(c_a).add_(models[1] * c_b)


@op("nuslerp_delta", inputs=("base", "models*"), params=NuSlerpParams, temps=5, passes=_NUSLERP_PASSES)
def nuslerp_delta(ctx, params, base, models):
    """base + SLERP of the two task vectors with t = w1 / (w0 + w1)."""
    c_a, c_b = _nuslerp_coefficients(params, ctx.stats)
    a, b = _vectors(base, models)
    return a.mul_(c_a).add_(b.mul_(c_b)).add_(base)


# -- NuSLERP per row (``nuslerp_flatten: false``) ------------------------------------------------

def _nuslerp_last_axis(params: NuSlerpParams, a, b):
    """mergekit's unflattened NuSLERP (one SLERP per vector of the last axis), operation for
    operation as ``ops/replay.py`` replays it on whole tensors: each row's result depends on that
    row alone, so row tiles give the whole tensor's bytes."""
    from .replay import (  # replay imports this module
        NuSlerpWholeParams,
        _mergekit_nuslerp_pair,
    )

    return _mergekit_nuslerp_pair(NuSlerpWholeParams(params.weights, flatten=False, row_wise=False, eps=params.eps), a, b)


@op("nuslerp_rows", inputs=("models*",), params=NuSlerpParams, temps=10)
def nuslerp_rows(ctx, params, models):
    """SLERP of two models per vector of the last axis (t = w1 / (w0 + w1)), streamed by rows."""
    return _nuslerp_last_axis(params, models[0], models[1])


@op("nuslerp_rows_delta", inputs=("base", "models*"), params=NuSlerpParams, temps=12)
def nuslerp_rows_delta(ctx, params, base, models):
    """base + SLERP of the two task vectors per vector of the last axis, streamed by rows."""
    return base + _nuslerp_last_axis(params, models[0] - base, models[1] - base)
