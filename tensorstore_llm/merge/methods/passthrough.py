"""``passthrough``: one model's tensors unchanged (mergekit's method for frankenmerges, with
``slices:``), optionally multiplied by a per-tensor ``scale`` (e.g. ``[{filter: o_proj, value:
0.5}, {value: 1}]``); a scale of 1 copies the stored values bit for bit."""
from __future__ import annotations

from ...engine.plan import InputRef
from ...errors import RecipeError
from .base import REAL, JobSpec, MergeMethod, Param


class Passthrough(MergeMethod):
    """Exactly one model (per slice); ``scale`` per tensor (default 1: a copy)."""

    name = "passthrough"
    parameters = {"scale": Param(REAL, per_model=True)}

    def check(self, recipe, where):
        if len(recipe.models) != 1:
            raise RecipeError(f"{where}: passthrough takes exactly one model (per slice), got {len(recipe.models)}")

    def job(self, recipe, tensor, state):
        entry = tensor.models[0]
        scale = tensor.value("scale", entry, 1.0)
        ref = InputRef(entry.ref, tensor.name)
        if scale == 1:
            return JobSpec("copy", (("x", ref),))
        return JobSpec("weighted_sum", (("models", (ref,)),), {"weights": [scale], "normalize": False})


METHODS = (Passthrough(),)
