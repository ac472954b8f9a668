"""Task arithmetic and its sparsified, sign-electing family as one op (anchor: mergekit — same
method names, parameters and defaults; mergekit's presets-as-flags design).

Notation: base θ0, models θi, task vectors τi = θi − θ0, weights wi.

- task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"): θ0 + λ Σ wi τi.
- TIES (Yadav et al. 2023, "TIES-Merging"): sparsify each τi, elect a sign per parameter from
  Σ wi τ̂i (ties to +), keep agreeing entries, divide by the agreeing weights.
- DARE, Model Breadcrumbs, DELLA: other sparsifications (``sparsify.py``), then linear or TIES
  election.

The merge methods map onto the flags (``sparsification``, ``consensus``, ``normalize``,
``rescale``) in ``merge/methods/task_arithmetic.py``. mergekit's own bf16 operation order is
replayed by a separate op (``replay.py``); the geometric merges are in ``geometry.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import ties_fused
from .exact import divide_
from .registry import op
from .sparsify import RESCALE_METHODS, SPARSIFICATIONS, sparsify, sparsify_passes, warm_kernels

CONSENSUS = ("none", "sum", "count")


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
    # della: rank a 1-D tensor's magnitudes over the whole tensor in a statistics pass. The
    # planner turns it off for tensors of two or more dims (ranked per row, no pass needed).
    rank_pass: bool = True

    def __post_init__(self):
        for name, value, allowed in (("sparsification", self.sparsification, SPARSIFICATIONS),
                                     ("consensus", self.consensus, CONSENSUS),
                                     ("rescale_method", self.rescale_method, RESCALE_METHODS)):
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



@op("task_arithmetic", inputs=("base", "models*"), params=TaskArithmeticParams, random=True,
    temps=lambda n: n + 4, passes=sparsify_passes, warm=warm_kernels)
def task_arithmetic(ctx, params, base, models):
    """θ0 + λ · combine_i(wi · sparsify(θi − θ0)): task arithmetic, TIES, DARE, breadcrumbs, DELLA."""
    if params.consensus == "none":  # one running sum: one delta alive at a time
        mixed = None
        for i, m in enumerate(models):
            weighted = sparsify(ctx, params, i, m - base).mul_(params.weights[i])
            mixed = weighted if mixed is None else mixed.add_(weighted)
        divisor = sum(params.weights)
        divisor = divisor if abs(divisor) >= 1e-8 else 1.0
    else:
        fused = ties_fused.merged(ctx, params, base, models) if params.consensus == "sum" else None
        if fused is not None:   # TIES in one compiled loop: the same values as below
            return fused
        weighted = [sparsify(ctx, params, i, m - base).mul_(params.weights[i]) for i, m in enumerate(models)]
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


# TIES takes the stored (bf16 / fp32) tiles straight into its compiled loop, no fp32 copies (engine/compute.py)
task_arithmetic.stored_inputs_path = ties_fused.merged

