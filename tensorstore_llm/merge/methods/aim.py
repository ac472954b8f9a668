"""``aim``: Activation-Informed Merging (Nobari et al. 2025, "Activation-Informed Merging of
Large Language Models", arXiv 2502.02421).

Task arithmetic θ0 + λ Σ wi τi (default wi = 1 / number of models: the mean task vector) whose
update is damped, column by column, where the base model's inputs are largest:
θ0 + (1 − ω·â) ⊙ λ Σ wi τi, with â the base's mean |input activation| per input column of each
linear weight, min-max normalised per tensor. The statistics come from one streamed pass of the
base model over a calibration corpus (``merge/activations.py``) and are kept in the
``activations`` file (reused while the base is the same). Other tensors (embeddings, norms) are
merged by plain task arithmetic. Kernel: ``ops/seed_merges.py`` (``protected_task_arithmetic``).
"""
from __future__ import annotations

import os

from ...engine.plan import InputRef
from ...errors import InvalidParameter, RecipeError
from ...ops import seed_merges  # noqa: F401  (registers the op)
from .base import LAMBDA, PATH, WEIGHT, JobSpec, MergeMethod, Param, Prepared, integer, interval, model_inputs

DEFAULT_OMEGA = 0.4


class ActivationInformed(MergeMethod):
    """base_model and at least one other model; ``calibration`` (a text / JSONL corpus) and / or
    ``activations`` (a .safetensors file of the statistics: read when it exists, else computed
    from ``calibration`` and written there); ``omega`` in [0, 1] (default 0.4); ``weight`` per
    model and ``lambda``."""

    name = "aim"
    parameters = {"weight": WEIGHT, "lambda": LAMBDA, "omega": Param(interval(0, 1)),
                  "calibration": Param(PATH, per_tensor=False), "activations": Param(PATH, per_tensor=False),
                  "calibration_samples": Param(integer(1), per_tensor=False),
                  "calibration_tokens": Param(integer(2), per_tensor=False)}

    def check_parameters(self, recipe, where):
        params = recipe.parameters
        if "calibration" not in params and "activations" not in params:
            raise RecipeError(f"{where}: aim needs parameters.calibration (a text / JSONL corpus for the base's "
                              f"activation statistics) or parameters.activations (a statistics file made earlier)")
        path = params.get("activations")
        if path is not None and not str(path).endswith(".safetensors"):
            raise InvalidParameter(f"{where}: parameters.activations must name a .safetensors file, got {path!r}")
        if path is not None and not os.path.exists(path) and "calibration" not in params:
            raise RecipeError(f"{where}: activations file {path} does not exist and there is no parameters.calibration "
                              f"to compute it from")

    def state(self, recipe, where, given):
        """``given["activations"]``: {weight name: per-column statistic}, else none can be planned."""
        stats = given.get("activations")
        if stats is None:
            raise RecipeError(f"{where}: aim is planned from the base's activation statistics; run it through "
                              f"api.merge (or give activations)")
        return stats

    def prepare(self, recipe, inputs, options):
        from ..activations import activation_statistics, corpus_digest, load_statistics, save_statistics

        inputs.validate({})   # every tensor and parameter checked before the model runs
        params, base = recipe.parameters, inputs.sources[recipe.base]
        path = params.get("activations")
        if path is not None and os.path.exists(path):
            stats = load_statistics(path, base_identity=base.identity, where=inputs.where)
            return Prepared(stats, {"activations": {"file": path, "reused": True}})
        if options.dry_run:   # a dry run must not run the model: planned without statistics
            return Prepared({})
        from ..sensitivity import read_corpus

        texts = read_corpus(str(params["calibration"]), int(params.get("calibration_samples", 64)))
        tokens = int(params.get("calibration_tokens", 256))
        stats = activation_statistics(base, inputs.files[recipe.base], texts, max_tokens=tokens,
                                      device="cpu" if options.device == "auto" else options.device,
                                      where=f"{inputs.where}: base model {recipe.base}")
        record = {"corpus": corpus_digest(texts), "tokens": int(stats["__tokens__"][0]), "reused": False}
        if path is not None:
            save_statistics(path, stats, base_identity=base.identity, corpus=record["corpus"])
            record["file"] = path
        return Prepared(stats, {"activations": record})

    def job(self, recipe, tensor, stats):
        value, others = tensor.value, tensor.others
        params = {"weights": [value("weight", m, 1.0 / len(others)) for m in others], "lam": value("lambda", default=1.0)}
        column = stats.get(tensor.name)
        if column is not None and len(tensor.shape) == 2 and column.numel() == tensor.shape[1]:
            params.update(omega=value("omega", default=DEFAULT_OMEGA), importance=[float(v) for v in column.tolist()])
        return JobSpec("protected_task_arithmetic", (("base", InputRef(tensor.base, tensor.name)),
                                                     ("models", model_inputs([m.ref for m in others], tensor.name))), params)


METHODS = (ActivationInformed(),)
