"""``ram`` and ``ramplus_tl``: Reinforced Agent Merging (arXiv 2601.13572): an entry changed by
one model keeps that change, one changed by several gets their mean; RAM+ (tensor-local) scales a
model's unique changes up by how much of its change the others share."""
from __future__ import annotations

import math

from ...engine.plan import InputRef
from .base import REAL, JobSpec, MergeMethod, Param, interval, model_inputs

# |τ| above it counts as changed: any magnitude >= 0 (mergekit takes any float), one value for the merge, not per model
THRESHOLD = Param(interval(0, math.inf))


class Ram(MergeMethod):
    """base_model and at least one other model; ``epsilon`` (1e-5) as mergekit. Element-wise,
    streamed by rows (op ``ram``)."""

    name = "ram"
    replayable = True   # the op computes in the compute dtype with mergekit's operations
    parameters = {"epsilon": THRESHOLD}

    def job(self, recipe, tensor, state):
        return JobSpec("ram", self.roles(tensor), {"epsilon": tensor.value("epsilon", default=1e-5)})

    @staticmethod
    def roles(tensor):
        return (("base", InputRef(tensor.base, tensor.name)),
                ("models", model_inputs([m.ref for m in tensor.others], tensor.name)))


class RamPlus(Ram):
    """RAM+ tensor-local: ``r`` (0.1), ``alpha`` (0.2) and ``epsilon`` (1e-5) as mergekit. A
    statistics pass counts each model's shared and unique entries, then rows (op ``ramplus_tl``)."""

    name = "ramplus_tl"
    parameters = {"r": Param(REAL), "alpha": Param(REAL), "epsilon": THRESHOLD}

    def job(self, recipe, tensor, state):
        return JobSpec("ramplus_tl", self.roles(tensor), {"epsilon": tensor.value("epsilon", default=1e-5),
                                                          "r": tensor.value("r", default=0.1),
                                                          "alpha": tensor.value("alpha", default=0.2)})


METHODS = (Ram(), RamPlus())
