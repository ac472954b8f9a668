"""``model_stock``: Model Stock (Jang et al. 2024), the interpolation ratio from the task vectors'
mean pairwise cosine, per tensor."""
from __future__ import annotations

from ...engine.plan import InputRef
from ...errors import RecipeError
from .base import BOOL, JobSpec, MergeMethod, Param, model_inputs


class ModelStock(MergeMethod):
    """base_model and at least one other model; ``filter_wise: true`` is refused."""

    name = "model_stock"
    replayable = True   # arithmetic="mergekit": ops/replay.py's mergekit_model_stock (whole tensors)
    parameters = {"filter_wise": Param(BOOL, per_tensor=False)}

    def check(self, recipe, where):
        if recipe.parameters.get("filter_wise", False):
            raise RecipeError(f"{where}: model_stock with filter_wise: true is not supported")
        super().check(recipe, where)

    def job(self, recipe, tensor, state):
        return JobSpec("model_stock", (("base", InputRef(tensor.base, tensor.name)),
                                       ("models", model_inputs([m.ref for m in tensor.others], tensor.name))))


METHODS = (ModelStock(),)
