"""Merge recipes: mergekit's YAML format, parsed and turned into a validated Plan.

Accepted as mergekit writes them: ``models`` (each ``model`` + per-model ``parameters``),
``base_model``, ``merge_method``, global ``parameters``, ``dtype`` / ``out_dtype`` and
``tokenizer_source`` (``base`` or unset). A parameter may be a scalar, a gradient list
(interpolated by layer: layer i of L gets t = i / (L - 1), tensors outside the layers t = 0, as
mergekit does) or a list of ``{filter, value}`` conditions (first whose filter is a substring of
the tensor name, ``*`` or absent matches). Model references are store refs, Hugging Face
directories or hub repo ids. Not supported (refused with a clear error): ``slices``,
``modules``, tokenizer merging (``tokenizer:`` or ``tokenizer_source`` other than ``base``).
Computation is fp32; ``out_dtype`` (else ``dtype``, else the base model's dtype) is the output dtype.
With ``arithmetic="mergekit"`` (linear and the task-arithmetic family) the kernels instead replay
mergekit 0.1.5's operations in ``dtype``, rounding where it rounds (e.g. bf16 task vectors).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from ..dtypes import by_name
from ..errors import DTypeError, RecipeError, TensorNotFound
from ..io.base import TensorMeta, TensorSource
from ..ops.layers import layer_key, sensitivity_weights
from ..ops.merge import PRESETS
from ..ops.registry import get_op
from .plan import InputRef, Plan, TensorJob, check_agreement

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
TOP_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source", "name"}
UNSUPPORTED = {"slices": "layer slicing (slices:) is not supported; merge whole models",
               "modules": "multi-module recipes (modules:) are not supported",
               "tokenizer": "tokenizer merging (tokenizer:) is not supported; use tokenizer_source: base"}
METHODS = ("linear", "slerp", "nuslerp", "model_stock", "sens_merging", "mediator", *PRESETS)


@dataclass
class ModelEntry:
    ref: str
    parameters: dict = field(default_factory=dict)


@dataclass
class MergeRecipe:
    """A parsed recipe; ``raw`` is kept for the artifact's lineage."""

    method: str
    models: list[ModelEntry]
    base: str | None
    parameters: dict
    out_dtype: str | None
    raw: dict
    dtype: str | None = None   # mergekit's compute dtype; used by arithmetic="mergekit" only


def load_recipe(text: str, where: str = "recipe") -> MergeRecipe:
    """Parse a mergekit YAML recipe; RecipeError naming the key for anything we cannot run."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping with merge_method, models, ...")
    for key, why in UNSUPPORTED.items():
        if key in raw:
            raise RecipeError(f"{where}: {why}")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known: {sorted(TOP_KEYS)}")
    method = raw.get("merge_method")
    if method not in METHODS:
        raise RecipeError(f"{where}: merge_method {method!r} is not supported; supported: {', '.join(METHODS)}")
    if raw.get("tokenizer_source") not in (None, "base"):
        raise RecipeError(f"{where}: tokenizer_source {raw['tokenizer_source']!r} is not supported (only 'base')")
    models = []
    for i, entry in enumerate(raw.get("models") or []):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise RecipeError(f"{where}: models[{i}] needs a 'model' reference")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise RecipeError(f"{where}: models[{i}].parameters must be a mapping")
        models.append(ModelEntry(str(entry["model"]), dict(params)))
    base = raw.get("base_model")
    base = str(base["model"] if isinstance(base, dict) else base) if base is not None else None
    try:
        dtype = by_name(raw["dtype"]).name if raw.get("dtype") is not None else None
        out_dtype = by_name(raw["out_dtype"]).name if raw.get("out_dtype") is not None else dtype
    except DTypeError as e:
        raise RecipeError(f"{where}: {e}") from None
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise RecipeError(f"{where}: parameters must be a mapping")
    recipe = MergeRecipe(method, models, base, dict(params), out_dtype, raw, dtype)
    _check_shape(recipe, where)
    return recipe


def _check_shape(recipe: MergeRecipe, where: str) -> None:
    others = [m for m in recipe.models if m.ref != recipe.base]
    if recipe.method == "linear":
        if not recipe.models:
            raise RecipeError(f"{where}: linear needs at least one entry under models")
        return
    if recipe.method == "nuslerp":
        if len(others) != 2:
            raise RecipeError(f"{where}: nuslerp merges exactly two models (besides an optional base_model), got {len(others)}")
        if recipe.parameters.get("nuslerp_flatten", True) is not True or recipe.parameters.get("nuslerp_row_wise", False):
            raise RecipeError(f"{where}: only flattened nuslerp is supported (nuslerp_flatten: true, nuslerp_row_wise: false)")
        return
    if recipe.method == "model_stock" and recipe.parameters.get("filter_wise", False):
        raise RecipeError(f"{where}: model_stock with filter_wise: true is not supported")
    if recipe.base is None:
        raise RecipeError(f"{where}: {recipe.method} needs base_model")
    if recipe.method == "slerp" and len(others) != 1:
        raise RecipeError(f"{where}: slerp merges base_model with exactly one other model, got {len(others)}")
    if not others:
        raise RecipeError(f"{where}: {recipe.method} needs at least one model besides base_model")


def evaluate(setting: Any, tensor: str, t: float, where: str) -> Any:
    """A parameter's value for one tensor: scalar, gradient (interpolated at t) or filter list."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return setting
    if not isinstance(setting, list) or not setting:
        raise RecipeError(f"{where}: cannot read {setting!r} as a value, gradient or filter list")
    if all(isinstance(e, dict) for e in setting):
        for cond in setting:
            pattern = cond.get("filter")
            if "value" not in cond:
                raise RecipeError(f"{where}: filter entry {cond!r} has no value")
            if pattern in (None, "*") or pattern in tensor:
                return evaluate(cond["value"], tensor, t, where)
        return None
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (scaled - i0)) * setting[i0] + (scaled - i0) * setting[i1]
    return setting[int(t * (len(setting) - 1))]


def layer_position(name: str, num_layers: int) -> float:
    """mergekit's t of a tensor: i / (L - 1) inside layer i (1 if L == 1), 0 outside the layers."""
    match = LAYER_RE.search(name)
    if not match:
        return 0.0
    return int(match.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


MERGEKIT_ARITHMETIC = ("linear", *PRESETS)


def plan_merge(recipe: MergeRecipe, sources: Mapping[str, TensorSource], where: str = "recipe",
               averaged_layers=None, arithmetic: str = "fp32", sensitivity: dict | None = None) -> Plan:
    """Every output tensor as a job with its own resolved parameters, validated up front.

    ``sources`` maps each model reference of the recipe (and the base) to an open TensorSource.
    ``averaged_layers(layer_key) -> bool`` is Mediator's decision (from ``analysis.conflict_table``).
    ``sensitivity`` ({model ref: {layer key: score}}) are Sens-Merging's scores when they were
    computed from a calibration corpus (else they come from the recipe's ``sensitivity`` file).
    ``arithmetic="mergekit"`` replays mergekit's operations in the recipe's ``dtype`` (default:
    the models' dtype) instead of computing in fp32, for bit-exact comparison with mergekit.
    """
    if arithmetic not in ("fp32", "mergekit"):
        raise RecipeError(f"{where}: arithmetic must be fp32 or mergekit, got {arithmetic!r}")
    if arithmetic == "mergekit" and recipe.method not in MERGEKIT_ARITHMETIC:
        raise RecipeError(f"{where}: mergekit arithmetic is replayed for {', '.join(MERGEKIT_ARITHMETIC)}; "
                          f"not for {recipe.method} (use the default fp32 arithmetic)")
    scores = None
    if recipe.method == "sens_merging":
        scores = sensitivity if sensitivity is not None else _load_sensitivity(recipe, where)
    base = recipe.base
    others = [m for m in recipe.models if m.ref != base]
    first = base if base is not None else recipe.models[0].ref
    names = list(sources[first].keys())
    layers = {int(m.group(1)) for n in names for m in [LAYER_RE.search(n)] if m}
    num_layers = max(layers) + 1 if layers else 0
    jobs = []
    for name in names:
        t = layer_position(name, num_layers)
        metas = {ref: _meta(sources, ref, name) for ref in dict.fromkeys([first, *(m.ref for m in recipe.models)])}
        check_agreement(name, list(metas.items()), sources, f"{where} (models of different shapes, e.g. vocabulary sizes, cannot be merged)")
        shape = metas[first].shape
        out_dtype = recipe.out_dtype if recipe.out_dtype and by_name(metas[first].dtype).is_float else metas[first].dtype
        value = lambda key, entry=None, default=None: _param(recipe, entry, key, name, t, default, where)
        if recipe.method == "linear":
            op_name, roles = "weighted_sum", (("models", tuple(InputRef(m.ref, name) for m in recipe.models)),)
            params = {"weights": [value("weight", m) for m in recipe.models], "normalize": value("normalize", default=True)}
        elif recipe.method == "slerp":
            op_name, roles = "slerp", (("a", InputRef(base, name)), ("b", InputRef(others[0].ref, name)))
            params = {"t": value("t")}
        elif recipe.method == "nuslerp":
            pair = ("models", tuple(InputRef(m.ref, name) for m in others))
            op_name, roles = ("nuslerp", (pair,)) if base is None else ("nuslerp_delta", (("base", InputRef(base, name)), pair))
            params = {"weights": [value("weight", m) for m in others]}
        elif recipe.method == "mediator":
            if averaged_layers(layer_key(name)):
                op_name, roles = "weighted_sum", (("models", tuple(InputRef(m.ref, name) for m in others)),)
                params = {"weights": [1.0] * len(others), "normalize": True}
            else:
                expert = value("expert", default=others[0].ref)
                if expert not in {m.ref for m in others}:
                    raise RecipeError(f"{where}: mediator expert {expert!r} is not one of the models")
                op_name, roles, params = "copy", (("x", InputRef(expert, name)),), {}
        elif recipe.method == "sens_merging":
            alphas = sensitivity_weights(scores, [m.ref for m in others], layer_key(name), value("temperature", default=1.0))
            op_name = "task_arithmetic"
            roles = (("base", InputRef(base, name)), ("models", tuple(InputRef(m.ref, name) for m in others)))
            params = {"weights": [a * value("weight", m, 1.0) for a, m in zip(alphas, others)],
                      "lam": value("lambda", default=1.0)}
        elif recipe.method == "model_stock":
            op_name = "model_stock"
            roles = (("base", InputRef(base, name)), ("models", tuple(InputRef(m.ref, name) for m in others)))
            params = {}
        else:
            sparsification, consensus, normalize, rescale = PRESETS[recipe.method]
            op_name = "task_arithmetic"
            roles = (("base", InputRef(base, name)), ("models", tuple(InputRef(m.ref, name) for m in others)))
            params = {"weights": [value("weight", m) for m in others],
                      "densities": [value("density", m, 1.0) for m in others],
                      "sparsification": sparsification, "consensus": consensus,
                      "normalize": value("normalize", default=normalize), "rescale": value("rescale", default=rescale),
                      "rescale_method": value("rescale_method", default="inverse"), "lam": value("lambda", default=1.0)}
            if sparsification == "magnitude_outliers":
                params["gammas"] = [value("gamma", m, 0.01) for m in others]
            if sparsification == "della":
                params["epsilons"] = [value("epsilon", m, 0.15) for m in others]
        compute_dtype = "float32"
        if arithmetic == "mergekit" and by_name(metas[first].dtype).is_float:
            params["arithmetic"] = "mergekit"
            compute_dtype = recipe.dtype or metas[first].dtype
        spec = get_op(op_name)
        job_params = spec.make_params(params, f"{where}: tensor {name!r}")
        if hasattr(job_params, "validate_inputs"):
            counts = {role: len(refs) if isinstance(refs, tuple) else 1 for role, refs in roles}
            try:
                job_params.validate_inputs(counts)
            except ValueError as e:
                raise RecipeError(f"{where}: tensor {name!r}: {e}") from None
        jobs.append(TensorJob(TensorMeta(name, shape, out_dtype), op_name, roles, job_params, compute_dtype))
    _check_unused(recipe, where)
    return Plan(jobs, dict(sources))


KNOWN_PARAMS = {
    "linear": {"weight", "normalize"},
    "slerp": {"t"},
    "nuslerp": {"weight", "nuslerp_flatten", "nuslerp_row_wise"},
    "model_stock": {"filter_wise"},
    "mediator": {"sigma", "expert"},
    "sens_merging": {"sensitivity", "calibration", "calibration_samples", "calibration_tokens", "temperature",
                     "weight", "lambda"},
    **{m: {"weight", "density", "normalize", "rescale", "rescale_method", "lambda", "int8_mask"}
       | ({"gamma"} if p[0] == "magnitude_outliers" else set()) | ({"epsilon"} if p[0] == "della" else set())
       for m, p in PRESETS.items()},
}


def _check_unused(recipe: MergeRecipe, where: str) -> None:
    known = KNOWN_PARAMS[recipe.method]
    for key in recipe.parameters:
        if key not in known:
            raise RecipeError(f"{where}: parameter {key!r} is not used by {recipe.method}; known: {sorted(known)}")
    for entry in recipe.models:
        for key in entry.parameters:
            if key not in known:
                raise RecipeError(f"{where}: parameter {key!r} of model {entry.ref} is not used by {recipe.method}; known: {sorted(known)}")


def _param(recipe: MergeRecipe, entry: ModelEntry | None, key: str, tensor: str, t: float, default, where: str):
    """Per-model setting first, then the global one, then the default; missing required -> error."""
    for settings in ([entry.parameters] if entry else []) + [recipe.parameters]:
        if key in settings:
            value = evaluate(settings[key], tensor, t, f"{where}: parameter {key!r}")
            if value is not None:
                return value
    if default is None:
        owner = f" for model {entry.ref}" if entry else ""
        raise RecipeError(f"{where}: {recipe.method} needs parameter {key!r}{owner} (tensor {tensor!r} has no value)")
    return default


def _load_sensitivity(recipe: MergeRecipe, where: str) -> dict:
    """Sens-Merging scores: {model ref: {layer key ('0', '1', ..., 'embed', 'final'): score}}."""
    path = recipe.parameters.get("sensitivity")
    if not isinstance(path, str):
        raise RecipeError(f"{where}: sens_merging needs parameters.sensitivity (a JSON/YAML file of per-layer scores "
                          f"per model) or parameters.calibration (a text / JSONL corpus to compute them from)")
    try:
        with open(path) as f:
            scores = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"{where}: cannot read sensitivity file {path}: {e}") from None
    refs = [m.ref for m in recipe.models if m.ref != recipe.base]
    if not isinstance(scores, dict) or any(not isinstance(scores.get(r), dict) for r in refs):
        raise RecipeError(f"{where}: {path} must map every model ({', '.join(refs)}) to {{layer: score}}")
    return {r: {str(k): float(v) for k, v in scores[r].items()} for r in refs}


def _meta(sources: Mapping[str, TensorSource], ref: str, name: str) -> TensorMeta:
    try:
        return sources[ref].meta(name)
    except TensorNotFound:
        raise TensorNotFound(f"tensor {name!r} is missing from model {ref} (present in the base / first model)") from None
