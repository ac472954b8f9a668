"""``mediator``: Mediator's layer routing (Lai et al. 2025). Layers whose task vectors conflict
in sign less than mu + sigma·k (k = ``sigma``) over all layers are averaged; the others are taken
from one expert. The conflict table is counted by reduction jobs (``merge/mediator.py``)."""
from __future__ import annotations

from ...engine.plan import InputRef
from ...errors import InvalidParameter, RecipeError
from ...ops.layers import layer_key
from ..safe_yaml import short
from .base import MODEL_REF, REAL, JobSpec, MergeMethod, Param, Prepared, model_inputs, others_of


class Mediator(MergeMethod):
    """base_model and at least one other model; ``expert`` (default: the first) for conflicting layers."""

    name = "mediator"
    parameters = {"sigma": Param(REAL, per_tensor=False), "expert": Param(MODEL_REF, per_tensor=False)}

    def check_parameters(self, recipe, where):
        expert = recipe.parameters.get("expert")
        others = [m.ref for m in others_of(recipe)]
        if expert is not None and str(expert) not in others:
            raise InvalidParameter(f"{where}: parameters.expert {short(expert)} is not one of the models ({', '.join(others)})")

    def state(self, recipe, where, given):
        """``given["averaged_layers"]``: layer key -> whether that layer is averaged."""
        averaged = given.get("averaged_layers")
        if averaged is None:
            raise RecipeError(f"{where}: mediator is planned from its conflict table; run it through api.merge "
                              f"(or give averaged_layers)")
        return averaged

    def prepare(self, recipe, inputs, options):
        from ..mediator import conflict_table

        inputs.validate(lambda key: True)   # everything checked before the models are read
        base = inputs.sources[recipe.base]
        table = conflict_table(base, [inputs.sources[m.ref] for m in others_of(recipe)], list(base.keys()),
                               float(recipe.parameters.get("sigma", 1.0)), max_memory=options.max_memory,
                               device=options.device, progress=options.progress)
        return Prepared(table.averaged, {"conflicts": table.to_json()}, table.to_json())

    def job(self, recipe, tensor, averaged):
        others = tensor.others
        if averaged(layer_key(tensor.name)):
            return JobSpec("weighted_sum", (("models", model_inputs([m.ref for m in others], tensor.name)),),
                           {"weights": [1.0] * len(others), "normalize": True})
        expert = str(tensor.value("expert", default=others[0].ref))
        if expert not in {m.ref for m in others}:
            raise RecipeError(f"{tensor.where}: mediator expert {expert!r} is not one of the models")
        return JobSpec("copy", (("x", InputRef(expert, tensor.name)),))


METHODS = (Mediator(),)
