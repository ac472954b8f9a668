"""``sce``: SCE merging from FuseChat (Wan et al. 2024, arXiv 2408.07990): select entries by
variance across the task vectors, calculate per-model weights from their energy, erase sign
conflicts."""
from __future__ import annotations

from ...engine.plan import InputRef
from .base import BOOL, JobSpec, MergeMethod, Param, interval, model_inputs


class Sce(MergeMethod):
    """base_model and at least one other model; ``select_topk`` (default 1: keep every entry)
    and ``int8_mask`` (mergekit's mask dtype; the result is the same) as mergekit. Streamed by
    rows (op ``sce``): the variance top-k (exact, ties by flat index) and the weights span the
    tensor, so they are statistics passes before the rows are merged."""

    name = "sce"
    replayable = True   # the op computes in the compute dtype with mergekit's operations
    parameters = {"select_topk": Param(interval(0, 1)), "int8_mask": Param(BOOL)}

    def job(self, recipe, tensor, state):
        return JobSpec("sce", (("base", InputRef(tensor.base, tensor.name)),
                               ("models", model_inputs([m.ref for m in tensor.others], tensor.name))),
                       {"select_topk": tensor.value("select_topk", default=1.0),
                        "int8_mask": tensor.value("int8_mask", default=False)})


METHODS = (Sce(),)
