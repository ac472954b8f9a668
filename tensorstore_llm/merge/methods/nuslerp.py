"""``nuslerp``: mergekit's SLERP of exactly two models with t = w1 / (w0 + w1), of their task
vectors when a base_model is given."""
from __future__ import annotations

from ...engine.plan import InputRef
from ...errors import RecipeError
from .base import BOOL, WEIGHT, JobSpec, MergeMethod, Param, model_inputs, others_of


class NuSlerp(MergeMethod):
    """Two models (besides an optional base); only the flattened variant."""

    name = "nuslerp"
    parameters = {"weight": WEIGHT, "nuslerp_flatten": Param(BOOL, per_tensor=False),
                  "nuslerp_row_wise": Param(BOOL, per_tensor=False)}

    def check(self, recipe, where):
        others = others_of(recipe)
        if len(others) != 2:
            raise RecipeError(f"{where}: nuslerp merges exactly two models (besides an optional base_model), got {len(others)}")
        if recipe.parameters.get("nuslerp_flatten", True) is not True or recipe.parameters.get("nuslerp_row_wise", False):
            raise RecipeError(f"{where}: only flattened nuslerp is supported (nuslerp_flatten: true, nuslerp_row_wise: false)")

    def job(self, recipe, tensor, state):
        pair = ("models", model_inputs([m.ref for m in tensor.others], tensor.name))
        params = {"weights": [tensor.value("weight", m) for m in tensor.others]}
        if tensor.base is None:
            return JobSpec("nuslerp", (pair,), params)
        return JobSpec("nuslerp_delta", (("base", InputRef(tensor.base, tensor.name)), pair), params)


METHODS = (NuSlerp(),)
