"""``karcher``: the Karcher (Riemannian) mean of the models on the unit sphere, rescaled by their
mean norm (Karcher 1977; mergekit's ``karcher``, arXiv 2603.04972)."""
from __future__ import annotations

from ...engine.plan import InputRef
from ...errors import RecipeError
from .base import JobSpec, MergeMethod, Param, integer, model_inputs
from .multislerp import NON_NEGATIVE


class Karcher(MergeMethod):
    """Every model with equal weight, a base_model counting as one more model (as mergekit, which
    gives karcher no base role); ``max_iter`` (10) and ``tol`` (1e-5) as mergekit. Streamed (op
    ``karcher``: a Gram-matrix statistics pass, then rows); a single model is copied unchanged."""

    name = "karcher"
    parameters = {"max_iter": Param(integer(0)), "tol": NON_NEGATIVE}

    def check(self, recipe, where):
        if not recipe.models and recipe.base is None:
            raise RecipeError(f"{where}: karcher needs at least one model")

    def job(self, recipe, tensor, state):
        refs = list(dict.fromkeys(([tensor.base] if tensor.base is not None else []) + [m.ref for m in tensor.models]))
        if len(refs) == 1:
            return JobSpec("copy", (("x", InputRef(refs[0], tensor.name)),))
        return JobSpec("karcher", (("models", model_inputs(refs, tensor.name)),),
                       {"max_iter": tensor.value("max_iter", default=10), "tol": tensor.value("tol", default=1e-5)})


METHODS = (Karcher(),)
