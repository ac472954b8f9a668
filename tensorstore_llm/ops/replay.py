"""mergekit 0.1.5's arithmetic replayed operation for operation, as ops of their own.

The default merge ops compute in fp32 and round once. These replay mergekit's order of
operations in the compute dtype the planner gives them (the recipe's ``dtype``, e.g. bf16), so
that a merge rounds exactly where mergekit's does: for bit-exact comparisons with mergekit
(``tsllm merge --arithmetic mergekit``). ``REPLAY_OF`` maps each default op to its replay.

- ``mergekit_linear``: ``linear_merge`` — an fp32 (fp64 for fp64 inputs) ``addcmul_`` of each
  input in its own dtype, divided by the fp32 sum of the weights, cast back to the inputs' dtype.
- ``mergekit_task_arithmetic``: ``GeneralizedTaskArithmeticMerge.merge_group`` and ``get_mask``
  in the inputs' dtype. Sparsification masks stay ours (exact magnitude thresholds, seeded
  draws: the same masks as ``task_arithmetic`` draws); the L1 rescale ratio is computed in fp64.
- ``mergekit_model_stock``: ``model_stock_merge_method`` on whole tensors in the inputs'
  dtype: its norms, cosines, t and interpolation round where mergekit's do; flattened, or with
  ``filter_wise`` one t per row (also the fp32 kernel of the filter-wise variant). Whole
  tensors (not row blocks): a comparison mode, not a streaming one.
- ``mergekit_nuslerp`` / ``mergekit_nuslerp_delta``: ``nuslerp_merge_method`` (without / with a
  base) on whole tensors, with its variants (``flatten``, ``row_wise``); also the fp32 kernel of
  NuSLERP's row-wise and unflattened variants (the streamed ``nuslerp`` op is the flattened one).
- ``nearswap``, ``sce``, ``arcee_fusion``, ``ram`` and ``ramplus_tl``
  are their own replays: written with mergekit's order of operations in the
  compute dtype, they round where mergekit does when planned in the recipe's ``dtype``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .basic import WeightedSumParams
from .geometry import ModelStockParams
from .merge import TaskArithmeticParams
from .registry import op
from .sparsify import sparsify, sparsify_passes

REPLAY_OF = {"weighted_sum": "mergekit_linear", "task_arithmetic": "mergekit_task_arithmetic",
             "model_stock": "mergekit_model_stock", "nuslerp": "mergekit_nuslerp", "nuslerp_delta": "mergekit_nuslerp_delta",
             "mergekit_nuslerp": "mergekit_nuslerp", "mergekit_nuslerp_delta": "mergekit_nuslerp_delta",
             "nuslerp_rows": "nuslerp_rows", "nuslerp_rows_delta": "nuslerp_rows_delta",   # mergekit's operations per row
             "mergekit_model_stock": "mergekit_model_stock",
             # ops of their own replay: they compute in the compute dtype with mergekit's operations
             "nearswap": "nearswap", "sce": "sce", "arcee_fusion": "arcee_fusion",
             "ram": "ram", "ramplus_tl": "ramplus_tl"}


@op("mergekit_linear", inputs=("models*",), params=WeightedSumParams, temps=3)
def mergekit_linear(ctx, params, models):
    """mergekit's linear merge replayed: fp32 addcmul of each input, / sum of weights, cast back."""
    first = models[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weight = torch.tensor(params.weights, dtype=dtype, device=first.device)
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(models, weight.unbind(0)):
        result.addcmul_(tensor, coefficient)
    if params.normalize:
        result.div_(weight.sum())
    return result.to(first.dtype)


@op("mergekit_task_arithmetic", inputs=("base", "models*"), params=TaskArithmeticParams, random=True,
    temps=lambda n: n + 4, passes=sparsify_passes)
def mergekit_task_arithmetic(ctx, params, base, models):
    """mergekit's generalized task arithmetic (TIES, DARE, ...) replayed in the inputs' dtype."""
    deltas = base.new_empty((len(models), *base.shape))
    for i, m in enumerate(models):
        deltas[i] = sparsify(ctx, params, i, m - base)
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



@op("mergekit_model_stock", inputs=("base", "models*"), params=ModelStockParams, rowwise=False,
    temps=lambda n: 2 * n + 4)
def mergekit_model_stock(ctx, params, base, models):
    """mergekit's Model Stock replayed on whole tensors in the inputs' dtype (same torch ops,
    same order)."""
    out_shape = base.shape
    if params.filter_wise:
        w_0, ws = (base.unsqueeze(0), [m.unsqueeze(0) for m in models]) if base.dim() == 1 else (base, list(models))
    else:
        w_0, ws = base.reshape(-1), [m.reshape(-1) for m in models]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for idx, offset_a in enumerate(offsets):
        for offset_b in offsets[idx + 1:]:
            norm_product = torch.norm(offset_a, dim=-1) * torch.norm(offset_b, dim=-1)
            cos_thetas.append(((offset_a * offset_b).sum(dim=-1) / norm_product.clamp(min=params.eps)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe_denominator = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe_denominator)
    average = sum(ws) / count
    return (t * average + (1 - t) * w_0).reshape(out_shape)


@dataclass(frozen=True)
class NuSlerpWholeParams:
    """NuSLERP of two models on whole tensors: t = w1 / (w0 + w1) (0.5 when the sum is ~0);
    ``flatten``: one vector per tensor; else per row of the last axis, or with ``row_wise`` per
    column (mergekit's dim 0)."""

    weights: tuple[float, ...]
    flatten: bool = True
    row_wise: bool = False
    eps: float = 1e-8

    def __post_init__(self):
        if len(self.weights) != 2 or not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"nuslerp takes two finite weights, got {self.weights}")

    def validate_inputs(self, counts: dict[str, int]) -> None:
        if counts["models"] != 2:
            raise ValueError(f"nuslerp merges exactly two models, got {counts['models']}")


def _mergekit_nuslerp_pair(params, v0, v1):
    """mergekit's ``nuslerp(t, v0, v1, dim, eps, flatten)``, operation for operation."""
    total = sum(params.weights)
    t = 0.5 if abs(total) < 1e-6 else params.weights[1] / total
    dim = 0 if params.row_wise else -1
    out_shape = v0.shape

    def normalize(x, eps=1e-7):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=eps)
    if params.flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos_theta = torch.sum(normalize(v0) * normalize(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= params.eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not params.flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


@op("mergekit_nuslerp", inputs=("models*",), params=NuSlerpWholeParams, rowwise=False, temps=10)
def mergekit_nuslerp(ctx, params, models):
    """NuSLERP of two models' whole tensors in the compute dtype (mergekit's operations)."""
    return _mergekit_nuslerp_pair(params, models[0], models[1])


@op("mergekit_nuslerp_delta", inputs=("base", "models*"), params=NuSlerpWholeParams, rowwise=False, temps=12)
def mergekit_nuslerp_delta(ctx, params, base, models):
    """base + NuSLERP of the two task vectors, whole tensors, in the compute dtype."""
    return base + _mergekit_nuslerp_pair(params, models[0] - base, models[1] - base)
