"""Kernels of the three merge methods from the seeds' "Long-to-Short via Model Merging" list.

Notation: base θ0, models θi, task vectors τi = θi − θ0, weights wi, scale λ. Every kernel
computes in fp32 (the executor casts the inputs and rounds the result once).

- ``protected_task_arithmetic`` (AIM: Nobari et al. 2025, "Activation-Informed Merging of Large
  Language Models", arXiv 2502.02421): θ0 + (1 − ω·â) ⊙ λ Σ wi τi, where â is the base model's
  mean |input activation| per input column, min-max normalised to [0, 1] over the tensor's
  columns and broadcast over the rows, so the columns that carry the base's largest activations
  move least. With no statistic (``importance=()``) it is plain task arithmetic (used for
  tensors that are not linear weights, and for Twin-Merging's shared model).
- ``lore_merge`` / ``lore_merge_from_base`` (LoRE-Merging: Liu et al. 2025, "LoRE-Merging:
  Exploring Low-Rank Estimation For Large Language Model Merging", arXiv 2502.10749): per
  tensor, coordinate descent on  Σi ||θ0 + δi − θi||²_F + μ Σi ||δi||_*  — δi = SVT_μ(θi − θ0)
  (singular value thresholding: singular values shrunk by μ, negatives dropped), then
  θ0 = mean_i(θi − δi) — for ``iterations`` rounds, starting from θ0 = the given base, else the
  mean of the models (no base needed). The result is θ0 + λ Σ wi δi. μ = ``mu`` · max_i σ1(θi −
  θ0_start): relative to the largest singular value of the starting residuals, so one setting
  fits every tensor. SVT runs on a randomised truncated SVD of rank ``rank`` (+ oversampling;
  Halko et al. 2011, seeded per tensor and model), exact when a residual's rank is below it.
  1-D tensors are treated as 1 x n matrices, scalars as 1 x 1.
- ``twin_expert`` (Twin-Merging: Lu et al. 2024, "Twin-Merging: Dynamic Integration of Modular
  Expertise in Model Merging", NeurIPS 2024): model i's exclusive knowledge θi − θs against the
  shared model θs = θ0 + λ Σ wj τj (rounded to the output dtype, as stored), compressed to a
  rank-``rank`` LoRA (A = √S Vᵀ, B = U √S, randomised SVD as ``lora_extract``), plus a record
  [||θi − θs||², captured σ²]. The router that mixes experts per input is not part of this.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..dtypes import by_name
from ..seeding import seed_for
from .lora import randomized_svd
from .registry import op


# -- AIM: task arithmetic whose update is damped on the columns the base activates most -----------

@dataclass(frozen=True)
class ProtectedParams:
    """wi per model, λ, AIM's ω, and the base's per-input-column statistic (empty: none)."""

    weights: tuple[float, ...]
    lam: float = 1.0
    omega: float = 0.0
    importance: tuple[float, ...] = ()

    def __post_init__(self):
        if not all(math.isfinite(v) for v in (*self.weights, self.lam, self.omega, *self.importance)):
            raise ValueError("weights, lambda, omega and the activation statistic must be finite numbers")
        if not 0 <= self.omega <= 1:
            raise ValueError(f"omega must be in [0, 1], got {self.omega}")

    def validate_inputs(self, counts: dict[str, int]) -> None:
        if counts.get("models", 0) != len(self.weights):
            raise ValueError(f"{counts.get('models', 0)} models but {len(self.weights)} weights")


def normalized_importance(importance: torch.Tensor) -> torch.Tensor:
    """â = (a − min a) / (max a − min a) in [0, 1]; all zeros when every column is equal."""
    low, high = importance.min(), importance.max()
    span = high - low
    return (importance - low) / span if float(span) > 0 else torch.zeros_like(importance)


def task_update(base: torch.Tensor, models, weights, lam: float) -> torch.Tensor:
    """λ Σ wi (θi − θ0), one running sum in fp32."""
    total = None
    for w, m in zip(weights, models):
        term = (m - base).mul_(w)
        total = term if total is None else total.add_(term)
    return total.mul_(lam) if lam != 1 else total


@op("protected_task_arithmetic", inputs=("base", "models*"), params=ProtectedParams, temps=lambda n: n + 3)
def protected_task_arithmetic(ctx, params, base, models):
    """θ0 + (1 − ω·â[col]) ⊙ λ Σ wi τi (AIM); plain task arithmetic without a statistic."""
    update = task_update(base, models, params.weights, params.lam)
    if params.importance and params.omega:
        if base.dim() != 2 or base.shape[1] != len(params.importance):
            raise ValueError(f"{ctx.output}: the activation statistic has {len(params.importance)} columns, "
                             f"the weight {tuple(ctx.shape)}")
        keep = 1 - params.omega * normalized_importance(torch.tensor(params.importance, dtype=base.dtype))
        update.mul_(keep.to(update.device)[None, :])          # rows x in, one factor per input column
    return update.add_(base)


# -- LoRE-Merging ------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoreParams:
    """wi per model, λ, the relative SVT threshold ``mu``, coordinate-descent rounds, SVD rank."""

    weights: tuple[float, ...]
    lam: float = 1.0
    mu: float = 0.1
    iterations: int = 3
    rank: int = 64
    oversample: int = 8

    def __post_init__(self):
        if not all(math.isfinite(v) for v in (*self.weights, self.lam, self.mu)):
            raise ValueError("weights, lambda and mu must be finite numbers")
        if not 0 <= self.mu <= 1:
            raise ValueError(f"mu must be in [0, 1], got {self.mu}")
        if self.iterations < 1 or self.rank < 1 or self.oversample < 0:
            raise ValueError(f"need iterations >= 1, rank >= 1, oversample >= 0, got {self.iterations}, "
                             f"{self.rank}, {self.oversample}")

    def validate_inputs(self, counts: dict[str, int]) -> None:
        if counts.get("models", 0) != len(self.weights):
            raise ValueError(f"{counts.get('models', 0)} models but {len(self.weights)} weights")


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view: matrices as they are, 1-D as 1 x n, scalars as 1 x 1, more dims as rows x rest."""
    return t.reshape(t.shape[0] if t.dim() >= 2 else 1, -1)


def truncated_svd(m: torch.Tensor, rank: int, oversample: int, generator) -> tuple:
    """(U, S, Vh) of the top ``rank`` singular triplets: exact SVD when it is no larger than the
    randomised sketch, else a randomised SVD (2 power iterations) seeded by ``generator``."""
    if min(m.shape) <= rank + oversample:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    return randomized_svd(m, rank, oversample=oversample, power_iters=2, generator=generator)


def singular_value_threshold(m: torch.Tensor, threshold: float, rank: int, oversample: int, generator) -> torch.Tensor:
    """SVT_τ(M) = U max(S − τ, 0) Vᵀ over the top ``rank`` singular triplets."""
    U, S, Vh = truncated_svd(m, rank, oversample, generator)
    return (U * (S - threshold).clamp_min(0)[None, :]) @ Vh          # out x r @ r x in


def lore_estimate(models, base, params: LoreParams, seed: int, name: str):
    """(θ0, [δi]) of LoRE's coordinate descent on the 2-D views of ``models`` (see module doc)."""
    views = [as_matrix(m) for m in models]
    theta0 = as_matrix(base).clone() if base is not None else torch.stack(views).mean(0)
    sigma1 = max(float(truncated_svd(v - theta0, 1, params.oversample,
                                     seed_for(seed, "lore_merge/sigma", name, i))[1][0]) for i, v in enumerate(views))
    threshold = params.mu * sigma1
    deltas = []
    for step in range(params.iterations):
        deltas = [singular_value_threshold(v - theta0, threshold, min(params.rank, *v.shape), params.oversample,
                                           seed_for(seed, f"lore_merge/{step}", name, i)) for i, v in enumerate(views)]
        theta0 = torch.stack([v - d for v, d in zip(views, deltas)]).mean(0)
    return theta0, deltas


def _lore(ctx, params, models, base=None):
    theta0, deltas = lore_estimate(models, base, params, ctx.seed, ctx.output)
    merged = theta0 + params.lam * sum(w * d for w, d in zip(params.weights, deltas))
    return merged.reshape(models[0].shape)


@op("lore_merge", inputs=("models*",), params=LoreParams, rowwise=False, random=True, temps=lambda n: 2 * n + 3)
def lore_merge(ctx, params, models):
    """LoRE-Merging without a base: θ0 starts at the mean of the models."""
    return _lore(ctx, params, models)


@op("lore_merge_from_base", inputs=("base", "models*"), params=LoreParams, rowwise=False, random=True,
    temps=lambda n: 2 * n + 4)
def lore_merge_from_base(ctx, params, base, models):
    """LoRE-Merging with θ0 starting at the given base."""
    return _lore(ctx, params, models, base)


# -- Twin-Merging: one task's exclusive knowledge as LoRA factors --------------------------------

@dataclass(frozen=True)
class TwinExpertParams:
    """The shared merge (wi, λ, the dtype it is stored in), which model, the rank and the module."""

    weights: tuple[float, ...]
    index: int
    rank: int
    module: str
    lam: float = 1.0
    shared_dtype: str = "float32"
    oversample: int = 0          # 0: max(10, rank // 2), as lora_extract

    def __post_init__(self):
        if not all(math.isfinite(v) for v in (*self.weights, self.lam)):
            raise ValueError("weights and lambda must be finite numbers")
        if not 0 <= self.index < len(self.weights) or self.rank < 1:
            raise ValueError(f"need 0 <= index < {len(self.weights)} and rank >= 1, got {self.index}, {self.rank}")
        by_name(self.shared_dtype)


def expert_factor_names(module: str, index: int) -> tuple[str, str, str]:
    """Output names (A, B, record) of model ``index``'s expert factors of ``module``."""
    return (f"expert{index}.{module}.lora_A.weight", f"expert{index}.{module}.lora_B.weight",
            f"expert{index}.{module}.record")


def shared_weight(base, models, weights, lam, dtype: str) -> torch.Tensor:
    """θs = θ0 + λ Σ wi τi as the shared model stores it (rounded to ``dtype``), back in fp32."""
    return task_update(base, models, weights, lam).add_(base).to(by_name(dtype).torch).to(base.dtype)


@op("twin_expert", inputs=("base", "models*"), params=TwinExpertParams, rowwise=False, random=True,
    temps=lambda n: n + 5)
def twin_expert(ctx, params, base, models):
    """A (r x in), B (out x r): the rank-r SVD of θi − θs; record: [||θi − θs||², Σ kept σ²]."""
    exclusive = models[params.index] - shared_weight(base, models, params.weights, params.lam, params.shared_dtype)
    rank = min(params.rank, *exclusive.shape)
    U, S, Vh = truncated_svd(exclusive, rank, params.oversample or max(10, rank // 2),
                             seed_for(ctx.seed, "twin_expert", params.module, params.index))
    root = S.sqrt()
    a, b, rec = expert_factor_names(params.module, params.index)
    energy = exclusive.double().square().sum()
    return {a: root[:, None] * Vh, b: U * root[None, :],
            rec: torch.stack([energy, S.double().square().sum()]).float()}
