"""``nuslerp``: mergekit's SLERP of exactly two models with t = w1 / (w0 + w1), of their task
vectors when a base_model is given."""
from __future__ import annotations

from ...engine.plan import InputRef
from ...errors import RecipeError
from .base import BOOL, WEIGHT, JobSpec, MergeMethod, Param, model_inputs, others_of


class NuSlerp(MergeMethod):
    """Two models (besides an optional base). The flattened variant (mergekit's default) is
    streamed (op ``nuslerp`` / ``nuslerp_delta``: norms by statistics passes), and so is
    ``nuslerp_flatten: false`` (one SLERP per row: ``nuslerp_rows*``, row blocks) on tensors of
    two or more axes; ``nuslerp_row_wise: true`` (per column) and unflattened 1-D tensors take
    whole tensors (``mergekit_nuslerp*``)."""

    name = "nuslerp"
    replayable = True
    parameters = {"weight": WEIGHT, "nuslerp_flatten": Param(BOOL, per_tensor=False),
                  "nuslerp_row_wise": Param(BOOL, per_tensor=False)}

    def check(self, recipe, where):
        others = others_of(recipe)
        if len(others) != 2:
            raise RecipeError(f"{where}: nuslerp merges exactly two models (besides an optional base_model), got {len(others)}")

    def job(self, recipe, tensor, state):
        pair = ("models", model_inputs([m.ref for m in tensor.others], tensor.name))
        params = {"weights": [tensor.value("weight", m) for m in tensor.others]}
        flatten = recipe.parameters.get("nuslerp_flatten", True)
        row_wise = recipe.parameters.get("nuslerp_row_wise", False)
        variant = not flatten or row_wise
        if variant:
            params.update(flatten=flatten, row_wise=row_wise)
        streamed, whole = ("nuslerp", "mergekit_nuslerp") if tensor.base is None else ("nuslerp_delta", "mergekit_nuslerp_delta")
        op = whole if variant else streamed
        if not flatten and not row_wise and len(tensor.shape) >= 2:   # per row: row blocks hold whole rows
            op, params = ("nuslerp_rows" if tensor.base is None else "nuslerp_rows_delta"), {"weights": params["weights"]}
        if tensor.base is None:
            return JobSpec(op, (pair,), params)
        return JobSpec(op, (("base", InputRef(tensor.base, tensor.name)), pair), params)


METHODS = (NuSlerp(),)
