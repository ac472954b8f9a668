"""``multislerp``: Multi-SLERP (C. Goddard 2025), barycentric interpolation of any number of models
on the hypersphere, of their task vectors when a base_model is given (mergekit's method)."""
from __future__ import annotations

import math

from ...engine.plan import InputRef
from ...errors import RecipeError
from .base import BOOL, WEIGHT, JobSpec, MergeMethod, Param, interval, model_inputs, others_of

NON_NEGATIVE = Param(interval(0, math.inf))


class MultiSlerp(MergeMethod):
    """At least one model besides an optional base; ``weight`` per model (required),
    ``normalize_weights`` (default true) and ``eps`` (1e-8) as mergekit. Streamed (op
    ``multislerp`` / ``multislerp_delta``: a Gram-matrix statistics pass, then rows); a single
    model is copied unchanged, as mergekit returns it."""

    name = "multislerp"
    parameters = {"weight": WEIGHT, "normalize_weights": Param(BOOL), "eps": NON_NEGATIVE}

    def check(self, recipe, where):
        if not others_of(recipe):
            raise RecipeError(f"{where}: multislerp needs at least one model besides base_model")

    def job(self, recipe, tensor, state):
        refs = [m.ref for m in tensor.others]
        if len(refs) == 1:
            return JobSpec("copy", (("x", InputRef(refs[0], tensor.name)),))
        params = {"weights": [tensor.value("weight", m) for m in tensor.others],
                  "normalize_weights": tensor.value("normalize_weights", default=True),
                  "eps": tensor.value("eps", default=1e-8)}
        models = ("models", model_inputs(refs, tensor.name))
        if tensor.base is None:
            return JobSpec("multislerp", (models,), params)
        return JobSpec("multislerp_delta", (("base", InputRef(tensor.base, tensor.name)), models), params)


METHODS = (MultiSlerp(),)
