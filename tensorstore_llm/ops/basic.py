"""The simplest ops: ``copy`` (import, export, dtype conversion) and ``weighted_sum``."""
from __future__ import annotations

from dataclasses import dataclass

from .exact import divide_
from .registry import op


@op("copy", inputs=("x",), compute=False, temps=0)
def copy(ctx, params, x):
    """Pass the stored values through unchanged; the executor casts to the output dtype, if any."""
    return x


@dataclass(frozen=True)
class WeightedSumParams:
    weights: tuple[float, ...]
    normalize: bool = False

    def __post_init__(self):
        if not self.weights:
            raise ValueError("weights must not be empty")
        if self.normalize and sum(self.weights) == 0:
            raise ValueError("weights sum to 0 and cannot be normalised")

    def validate_inputs(self, counts: dict[str, int]) -> None:
        if counts["models"] != len(self.weights):
            raise ValueError(f"{counts['models']} models but {len(self.weights)} weights")


@op("weighted_sum", inputs=("models*",), params=WeightedSumParams, temps=3)
def weighted_sum(ctx, params, models):
    """sum_i w_i * x_i, accumulated in input order (divided by sum_i w_i when ``normalize``).

    Multiplies and adds are separate ops (no fused multiply-add) so CPU and CUDA agree bit for bit;
    inputs are visited once, so one fp32 copy of one input is alive at a time (temps: total,
    copy, product).
    """
    total = models[0] * params.weights[0]
    for w, x in zip(params.weights[1:], models[1:]):
        total += x * w
    if params.normalize:
        divide_(total, sum(params.weights))
    return total

