"""``linear``: the weighted average of the models (a model soup; Wortsman et al. 2022)."""
from __future__ import annotations

from ...errors import RecipeError
from .base import NORMALIZE, WEIGHT, JobSpec, MergeMethod, model_inputs


class Linear(MergeMethod):
    """sum_i w_i θ_i, divided by sum_i w_i unless ``normalize: false``; no base model needed."""

    name = "linear"
    parameters = {"weight": WEIGHT, "normalize": NORMALIZE}
    replayable = True

    def check(self, recipe, where):
        if not recipe.models:
            raise RecipeError(f"{where}: linear needs at least one entry under models")

    def job(self, recipe, tensor, state):
        return JobSpec("weighted_sum", (("models", model_inputs([m.ref for m in recipe.models], tensor.name)),),
                       {"weights": [tensor.value("weight", m) for m in recipe.models],
                        "normalize": tensor.value("normalize", default=True)})


METHODS = (Linear(),)
