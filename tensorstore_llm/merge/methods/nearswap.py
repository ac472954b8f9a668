"""``nearswap``: NearSwap (alchemonaut 2024, "QuartetAnemoi-70B-t0.0001"): entries where the
model lies within ``t`` of the base take the model's value, the rest move towards it by
t / |θ0 − θ1|."""
from __future__ import annotations

import math

from ...engine.plan import InputRef
from ...errors import RecipeError
from .base import JobSpec, MergeMethod, Param, interval, others_of

# mergekit takes any t for nearswap (it is a distance, not slerp's fraction): refuse only what
# has no meaning (a negative distance, NaN); t = 0 keeps the base.
DISTANCE = Param(interval(0, math.inf))


class NearSwap(MergeMethod):
    """base_model and exactly one other model; ``t`` per tensor (required; any finite distance
    >= 0, as mergekit, whose examples use ~1e-4; not slerp's [0, 1]). Element-wise, streamed by
    rows (op ``nearswap``)."""

    name = "nearswap"
    replayable = True   # the op computes in the compute dtype with mergekit's operations
    parameters = {"t": DISTANCE}

    def check(self, recipe, where):
        if recipe.base is None:
            raise RecipeError(f"{where}: nearswap needs base_model")
        if len(others_of(recipe)) != 1:
            raise RecipeError(f"{where}: nearswap merges base_model with exactly one other model, got {len(others_of(recipe))}")

    def job(self, recipe, tensor, state):
        return JobSpec("nearswap", (("base", InputRef(tensor.base, tensor.name)),
                                    ("model", InputRef(tensor.others[0].ref, tensor.name))), {"t": tensor.value("t")})


METHODS = (NearSwap(),)
