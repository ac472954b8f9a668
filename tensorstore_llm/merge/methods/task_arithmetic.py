"""The task-arithmetic family as data: task_arithmetic, ties, dare_linear, dare_ties,
breadcrumbs, breadcrumbs_ties, della, della_linear. One method class with flags, as mergekit's
presets; every one plans op ``task_arithmetic`` (``ops/merge.py``) with its sparsification
(``ops/sparsify.py``), sign consensus and defaults.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...engine.plan import InputRef
from .base import (
    BOOL,
    DENSITY,
    EPSILON,
    GAMMA,
    LAMBDA,
    NORMALIZE,
    WEIGHT,
    Domain,
    JobSpec,
    MergeMethod,
    Param,
    model_inputs,
)

RESCALE_METHOD = Param(Domain("inverse or l1", lambda v: v in ("inverse", "l1")))


@dataclass(frozen=True)
class Preset:
    """A method's flags: which entries of each task vector survive, how signs are elected, and
    the defaults of ``normalize`` and ``rescale``."""

    sparsification: str   # none, magnitude, random, magnitude_outliers, della
    consensus: str        # none, sum, count
    normalize: bool
    rescale: bool


PRESETS = {
    "task_arithmetic": Preset("none", "none", False, False),
    "ties": Preset("magnitude", "sum", True, False),
    "dare_linear": Preset("random", "none", False, True),
    "dare_ties": Preset("random", "sum", False, True),
    "breadcrumbs": Preset("magnitude_outliers", "none", False, False),
    "breadcrumbs_ties": Preset("magnitude_outliers", "sum", False, False),
    "della": Preset("della", "sum", True, True),
    "della_linear": Preset("della", "none", False, True),
}


class TaskArithmeticFamily(MergeMethod):
    """θ0 + λ · combine_i(wi · sparsify(θi − θ0)) with ``preset``'s flags; needs base_model."""

    replayable = True

    def __init__(self, name: str, preset: Preset):
        self.name = name
        self.preset = preset
        self.parameters = {"weight": WEIGHT, "density": DENSITY, "normalize": NORMALIZE, "rescale": Param(BOOL),
                           "rescale_method": RESCALE_METHOD, "lambda": LAMBDA, "int8_mask": Param(BOOL),
                           **({"gamma": GAMMA} if preset.sparsification == "magnitude_outliers" else {}),
                           **({"epsilon": EPSILON} if preset.sparsification == "della" else {})}

    def job(self, recipe, tensor, state):
        value, others, preset = tensor.value, tensor.others, self.preset
        params = {"weights": [value("weight", m) for m in others],
                  "densities": [value("density", m, 1.0) for m in others],
                  "sparsification": preset.sparsification, "consensus": preset.consensus,
                  "normalize": value("normalize", default=preset.normalize), "rescale": value("rescale", default=preset.rescale),
                  "rescale_method": value("rescale_method", default="inverse"), "lam": value("lambda", default=1.0)}
        if preset.sparsification == "magnitude_outliers":
            params["gammas"] = [value("gamma", m, 0.01) for m in others]
        if preset.sparsification == "della":
            params["epsilons"] = [value("epsilon", m, 0.15) for m in others]
            params["rank_pass"] = len(tensor.shape) == 1   # other tensors rank per row, inside a block
        return JobSpec("task_arithmetic", (("base", InputRef(tensor.base, tensor.name)),
                                           ("models", model_inputs([m.ref for m in others], tensor.name))), params)


METHODS = tuple(TaskArithmeticFamily(name, preset) for name, preset in PRESETS.items())
