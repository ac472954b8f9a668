"""``model_stock``: Model Stock (Jang et al. 2024), the interpolation ratio from the task vectors'
mean pairwise cosine, per tensor."""
from __future__ import annotations

from ...engine.plan import InputRef
from .base import BOOL, JobSpec, MergeMethod, Param, model_inputs


class ModelStock(MergeMethod):
    """base_model and at least one other model. ``filter_wise: true`` (one interpolation ratio
    per row, as mergekit) computes on whole tensors (op ``mergekit_model_stock``)."""

    name = "model_stock"
    replayable = True   # arithmetic="mergekit": ops/replay.py's mergekit_model_stock (whole tensors)
    parameters = {"filter_wise": Param(BOOL, per_tensor=False)}

    def job(self, recipe, tensor, state):
        filter_wise = recipe.parameters.get("filter_wise", False)
        return JobSpec("mergekit_model_stock" if filter_wise else "model_stock",
                       (("base", InputRef(tensor.base, tensor.name)),
                        ("models", model_inputs([m.ref for m in tensor.others], tensor.name))),
                       {"filter_wise": True} if filter_wise else {})


METHODS = (ModelStock(),)
