"""``lore``: LoRE-Merging (Liu et al. 2025, "LoRE-Merging: Exploring Low-Rank Estimation For
Large Language Model Merging", arXiv 2502.10749).

Per tensor, a shared base θ0 and low-rank task vectors δi are estimated by coordinate descent on
Σi ||θ0 + δi − θi||² + μ Σi ||δi||_* (singular value thresholding for δi, the mean for θ0), and
the result is θ0 + λ Σ wi δi. The original base is not needed: without ``base_model`` θ0 starts
at the models' mean; with one it starts there. Kernel: ``ops/seed_merges.py``.
"""
from __future__ import annotations

from ...engine.plan import InputRef
from ...errors import RecipeError
from ...ops import seed_merges  # noqa: F401  (registers the op)
from .base import LAMBDA, WEIGHT, JobSpec, MergeMethod, Param, integer, interval, model_inputs, others_of


class LoreMerging(MergeMethod):
    """At least two models (besides an optional base_model); ``mu`` in [0, 1] is the SVT
    threshold relative to the largest singular value of the starting residuals (default 0.1),
    ``iterations`` the coordinate-descent rounds (default 3), ``rank`` the most singular values
    each δi keeps (default 64), ``weight`` per model (default 1) and ``lambda`` (default 1)."""

    name = "lore"
    parameters = {"weight": WEIGHT, "lambda": LAMBDA, "mu": Param(interval(0, 1)), "iterations": Param(integer(1)),
                  "rank": Param(integer(1))}

    def check(self, recipe, where):
        if len(others_of(recipe)) < 2:
            raise RecipeError(f"{where}: lore needs at least two models besides base_model (base_model is optional)")

    def job(self, recipe, tensor, state):
        value, others = tensor.value, tensor.others
        params = {"weights": [value("weight", m, 1.0) for m in others], "lam": value("lambda", default=1.0),
                  "mu": value("mu", default=0.1), "iterations": value("iterations", default=3),
                  "rank": value("rank", default=64)}
        models = ("models", model_inputs([m.ref for m in others], tensor.name))
        if tensor.base is None:
            return JobSpec("lore_merge", (models,), params)
        return JobSpec("lore_merge_from_base", (("base", InputRef(tensor.base, tensor.name)), models), params)


METHODS = (LoreMerging(),)
