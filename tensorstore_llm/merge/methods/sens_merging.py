"""``sens_merging``: Sens-Merging (Liu et al. 2025). Task arithmetic whose per-layer weights are a
softmax over models of per-layer sensitivity scores (temperature ``temperature``), read from a
``sensitivity`` file or computed from a ``calibration`` corpus (``merge/sensitivity.py``)."""
from __future__ import annotations

from ...engine.plan import InputRef
from ...errors import InvalidParameter, RecipeError
from ...ops.layers import layer_key, sensitivity_weights
from .base import (
    LAMBDA,
    PATH,
    WEIGHT,
    JobSpec,
    MergeMethod,
    Param,
    Prepared,
    integer,
    interval,
    is_number,
    model_inputs,
    others_of,
)

MAX_SCORES_BYTES = 16 << 20  # a scores file: one number per layer per model


class SensMerging(MergeMethod):
    """base_model and at least one other model; scores from a file or a calibration corpus."""

    name = "sens_merging"
    parameters = {"sensitivity": Param(PATH, per_tensor=False), "calibration": Param(PATH, per_tensor=False),
                  "calibration_samples": Param(integer(1), per_tensor=False),
                  "calibration_tokens": Param(integer(2), per_tensor=False),
                  "temperature": Param(interval(0, float("inf"), low_open=True, high_open=True)),
                  "weight": WEIGHT, "lambda": LAMBDA}

    def state(self, recipe, where, given):
        """The scores given (``given["sensitivity"]``), else those of the recipe's sensitivity file."""
        scores = given.get("sensitivity")
        return scores if scores is not None else load_sensitivity(recipe, where)

    def prepare(self, recipe, inputs, options):
        params = recipe.parameters
        if "calibration" not in params or "sensitivity" in params:
            return Prepared(self.state(recipe, inputs.where, {}))
        others = [m.ref for m in others_of(recipe)]
        if options.dry_run:   # a dry run must not run the models: uniform weights
            scores = {ref: {} for ref in others}
        else:
            from ..sensitivity import layer_sensitivities, read_corpus

            texts = read_corpus(str(params["calibration"]), int(params.get("calibration_samples", 64)))
            tokens = int(params.get("calibration_tokens", 256))
            scores = {ref: layer_sensitivities(inputs.sources[recipe.base], inputs.sources[ref], inputs.files[ref], texts,
                                               max_tokens=tokens, where=f"{inputs.where}: model {ref}")
                      for ref in others}
        return Prepared(scores, {"sensitivity": scores})

    def job(self, recipe, tensor, scores):
        value, others = tensor.value, tensor.others
        alphas = sensitivity_weights(scores, [m.ref for m in others], layer_key(tensor.name), value("temperature", default=1.0))
        return JobSpec("task_arithmetic", (("base", InputRef(tensor.base, tensor.name)),
                                           ("models", model_inputs([m.ref for m in others], tensor.name))),
                       {"weights": [a * value("weight", m, 1.0) for a, m in zip(alphas, others)],
                        "lam": value("lambda", default=1.0)})


def load_sensitivity(recipe, where: str) -> dict:
    """Sens-Merging scores from the recipe's ``sensitivity`` file (JSON / YAML, read safely):
    {model ref: {layer key ('0', '1', ..., 'embed', 'final'): score}}."""
    from ..safe_yaml import safe_yaml, short

    path = recipe.parameters.get("sensitivity")
    if not isinstance(path, str):
        raise RecipeError(f"{where}: sens_merging needs parameters.sensitivity (a JSON/YAML file of per-layer scores "
                          f"per model) or parameters.calibration (a text / JSONL corpus to compute them from)")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SCORES_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"{where}: cannot read sensitivity file {path}: {e.strerror or e}") from None
    scores = safe_yaml(data, f"{where}: sensitivity file {path}", max_bytes=MAX_SCORES_BYTES)
    refs = [m.ref for m in others_of(recipe)]
    if not isinstance(scores, dict) or any(not isinstance(scores.get(r), dict) for r in refs):
        raise RecipeError(f"{where}: {path} must map every model ({', '.join(refs)}) to {{layer: score}}")
    for r in refs:
        for layer, value in scores[r].items():
            if not is_number(value):
                raise InvalidParameter(f"{where}: sensitivity file {path}: score of model {r} layer {layer} must be "
                                       f"a finite number, got {short(value)}")
    return {r: {str(k): float(v) for k, v in scores[r].items()} for r in refs}


METHODS = (SensMerging(),)
