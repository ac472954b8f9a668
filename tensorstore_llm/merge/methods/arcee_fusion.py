"""``arcee_fusion``: Arcee Fusion (arcee.ai 2025): take the model's change only where its
importance — |Δ| times the KL divergence of the row's softmax — is an outlier of the tensor
(above median + 1.5 IQR)."""
from __future__ import annotations

from ...engine.plan import InputRef
from ...errors import RecipeError
from .base import JobSpec, MergeMethod, others_of


class ArceeFusion(MergeMethod):
    """base_model and exactly one other model; no parameters. Streamed by rows (op
    ``arcee_fusion``): the threshold's quantiles of the whole tensor are exact order statistics
    from two statistics passes (mergekit estimates them from 10⁶ random entries in tensors larger
    than that); a 1-D tensor's softmax spans it, so its entries are gathered in one more pass."""

    name = "arcee_fusion"
    replayable = True   # the op computes in the compute dtype with mergekit's operations
    parameters = {}

    def check(self, recipe, where):
        if recipe.base is None:
            raise RecipeError(f"{where}: arcee_fusion needs base_model")
        if len(others_of(recipe)) != 1:
            raise RecipeError(f"{where}: arcee_fusion merges base_model with exactly one other model, "
                              f"got {len(others_of(recipe))}")

    def job(self, recipe, tensor, state):
        return JobSpec("arcee_fusion", (("base", InputRef(tensor.base, tensor.name)),
                                        ("model", InputRef(tensor.others[0].ref, tensor.name))),
                       {"whole_tensor_kl": len(tensor.shape) == 1})


METHODS = (ArceeFusion(),)
