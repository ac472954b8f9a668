"""``slerp``: spherical interpolation from base_model (t = 0) to the other model (t = 1)."""
from __future__ import annotations

from ...engine.plan import InputRef
from ...errors import RecipeError
from .base import JobSpec, MergeMethod, Param, interval, others_of

T = Param(interval(0, 1))


class Slerp(MergeMethod):
    """SLERP of two models' flattened tensors (op ``slerp``), t per tensor."""

    name = "slerp"
    parameters = {"t": T}

    def check(self, recipe, where):
        if recipe.base is None:
            raise RecipeError(f"{where}: slerp needs base_model")
        others = others_of(recipe)
        if len(others) != 1:
            raise RecipeError(f"{where}: slerp merges base_model with exactly one other model, got {len(others)}")

    def job(self, recipe, tensor, state):
        return JobSpec("slerp", (("a", InputRef(tensor.base, tensor.name)), ("b", InputRef(tensor.others[0].ref, tensor.name))),
                       {"t": tensor.value("t")})


METHODS = (Slerp(),)
