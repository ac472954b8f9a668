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
"""
from __future__ import annotations

import torch

from .basic import WeightedSumParams
from .merge import TaskArithmeticParams
from .registry import op
from .sparsify import sparsify, sparsify_passes

REPLAY_OF = {"weighted_sum": "mergekit_linear", "task_arithmetic": "mergekit_task_arithmetic"}


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

