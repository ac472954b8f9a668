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

Recipes are untrusted input. They are read by a safe YAML loader that refuses anchors and
aliases (no expansion bombs), tags that build anything but plain data, documents over
``MAX_RECIPE_BYTES`` and nesting deeper than ``MAX_DEPTH``; NaN and infinities are refused
anywhere, and every parameter is checked against its domain (``PARAMETER_DOMAINS``) when the
recipe is read, before any model is opened.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import yaml

from ..dtypes import by_name
from ..errors import DTypeError, InvalidParameter, RecipeError, TensorNotFound
from ..io.base import TensorMeta, TensorSource
from ..ops.layers import layer_key, sensitivity_weights
from ..ops.merge import PRESETS
from ..ops.registry import get_op
from ..engine.plan import InputRef, Plan, TensorJob, check_agreement

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


MAX_RECIPE_BYTES = 1 << 20   # real recipes are a few KB; per-layer gradient lists stay far below this
MAX_SCORES_BYTES = 16 << 20  # a scores file: one number per layer per model
MAX_DEPTH = 24               # a recipe's deepest legitimate path is about 9 levels
_PLAIN = (str, int, float, bool, type(None))


class _Refused(yaml.YAMLError):
    """Raised by the recipe loader while composing; becomes a RecipeError."""


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, stricter for untrusted recipes: anchors and aliases are refused
    before anything is expanded, and nesting deeper than ``max_depth`` stops the composer (which
    is recursive) long before Python's stack limit. Dates stay strings (no timestamp resolver).
    """

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream, max_depth: int = MAX_DEPTH):
        super().__init__(stream)
        self._depth = 0
        self._max_depth = max_depth

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1 if event.start_mark else "?"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(f"line {line}: YAML anchors and aliases (&name / *name) are not allowed in recipes")
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                raise _Refused(f"line {line}: nested deeper than {self._max_depth} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def safe_yaml(text: str | bytes, where: str, max_bytes: int = MAX_RECIPE_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse untrusted YAML (a recipe, a scores file) into plain data, or raise RecipeError.

    Refuses: more than ``max_bytes``, anchors / aliases, nesting over ``max_depth``, tags that
    build anything but mappings with string keys, lists, strings, numbers, booleans and null,
    and NaN or infinite numbers anywhere.
    """
    if isinstance(text, bytes):
        if len(text) > max_bytes:
            raise RecipeError(f"{where}: {len(text)} bytes is over the limit of {max_bytes} bytes")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(f"{where}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(text, str):
        raise RecipeError(f"{where}: expected YAML text, got {type(text).__name__}")
    if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise RecipeError(f"{where}: {len(text.encode('utf-8', 'surrogatepass'))} bytes is over the limit of {max_bytes} bytes")
    loader = None
    try:
        loader = RecipeLoader(text, max_depth)   # its reader already refuses unprintable characters
        data = loader.get_single_data()
    except _Refused as e:
        raise RecipeError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML ({_first_line(e)})") from None
    except (ValueError, OverflowError, UnicodeError) as e:  # e.g. an integer of more than 4300 digits
        raise RecipeError(f"{where}: not valid YAML ({_first_line(e)})") from None
    finally:
        if loader is not None:
            loader.dispose()
    _check_plain(data, where, "")
    return data


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:200]


def _check_plain(node: Any, where: str, path: str) -> None:
    """Only plain data: string-keyed mappings, lists, strings, finite numbers, booleans, null."""
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                raise RecipeError(f"{where}: key {key!r}{_at(path)} is not a string")
            name = key if key.isidentifier() else repr(key)   # a key with a newline stays on one line
            _check_plain(value, where, f"{path}.{name}" if path else name)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_plain(value, where, f"{path}[{i}]")
    elif isinstance(node, float):
        if not math.isfinite(node):
            raise RecipeError(f"{where}: {path or 'the document'} is {node!r}; NaN and infinities are not allowed")
    elif not isinstance(node, _PLAIN):
        raise RecipeError(f"{where}: {path or 'the document'} is a {type(node).__name__}; recipes hold only "
                          f"mappings, lists, strings, numbers, booleans and null")


def _at(path: str) -> str:
    return f" under {path}" if path else ""


def read_recipe_file(path: str) -> str:
    """The text of recipe file ``path``, refusing files over MAX_RECIPE_BYTES without reading them whole."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: over the {MAX_RECIPE_BYTES}-byte limit for recipes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start})") from None


def load_recipe(text: str, where: str = "recipe") -> MergeRecipe:
    """Parse a mergekit YAML recipe; RecipeError naming the key for anything we cannot run.

    Every parameter's value (scalar, each gradient point, each filter value) is checked against
    its domain here, so a recipe that parses is one whose parameters are all in range.

    Example:
        >>> load_recipe("{merge_method: linear, models: [a, b], parameters: {weight: 0.5}}").method
        'linear'
    """
    raw = safe_yaml(text, where)
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping with merge_method, models, ...")
    for key, why in UNSUPPORTED.items():
        if key in raw:
            raise RecipeError(f"{where}: {why}")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known: {sorted(TOP_KEYS)}")
    method = raw.get("merge_method")
    if not isinstance(method, str) or method not in METHODS:
        raise RecipeError(f"{where}: merge_method {method!r} is not supported; supported: {', '.join(METHODS)}")
    if raw.get("tokenizer_source") not in (None, "base"):
        raise RecipeError(f"{where}: tokenizer_source {raw['tokenizer_source']!r} is not supported (only 'base')")
    entries = raw.get("models")
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise RecipeError(f"{where}: models must be a list of entries (- model: REF), got {type(entries).__name__} "
                          f"{_short(entries)}")
    models = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise RecipeError(f"{where}: models[{i}] needs a 'model' reference")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise RecipeError(f"{where}: models[{i}] has unknown key(s) {extra}; known: ['model', 'parameters']")
        params = entry.get("parameters")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise RecipeError(f"{where}: models[{i}].parameters must be a mapping")
        models.append(ModelEntry(_ref(entry["model"], f"{where}: models[{i}].model"), dict(params)))
    base = raw.get("base_model")
    if isinstance(base, dict):
        if "model" not in base:
            raise RecipeError(f"{where}: base_model needs a 'model' reference")
        base = base["model"]
    base = _ref(base, f"{where}: base_model") if base is not None else None
    dtype = _float_dtype(raw, "dtype", where)
    out_dtype = _float_dtype(raw, "out_dtype", where) or dtype
    params = raw.get("parameters")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise RecipeError(f"{where}: parameters must be a mapping")
    recipe = MergeRecipe(method, models, base, dict(params), out_dtype, raw, dtype)
    _check_shape(recipe, where)
    _check_parameters(recipe, where)
    return recipe


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _ref(value: Any, where: str) -> str:
    """A model reference: a string (an integer, as YAML reads a tag like ``2024``, is taken as text)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "" or not str(value).isprintable():
        raise RecipeError(f"{where}: expected a model reference (store tag / id, directory or hub repo), got {_short(value)}")
    return str(value)


def _float_dtype(raw: dict, key: str, where: str) -> str | None:
    if raw.get(key) is None:
        return None
    try:
        dtype = by_name(raw[key])
    except DTypeError as e:
        raise RecipeError(f"{where}: {key}: {e}") from None
    if not dtype.is_float:
        raise RecipeError(f"{where}: {key}: {dtype.name} is not a float dtype; merges compute and store float weights "
                          f"(bfloat16, float16, float32, ...)")
    return dtype.name


# -- parameter domains -------------------------------------------------------------------------

@dataclass(frozen=True)
class Domain:
    """What one parameter's values may be; ``text`` is the documentation (README's table)."""

    text: str
    check: Callable[[Any], bool]


def _is_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:   # an int too large for a float
        return False


def _interval(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Domain:
    brackets = ("(" if low_open else "[", ")" if high_open else "]")
    text = (f"a finite number {'>' if low_open else '>='} {low:g}" if high == math.inf
            else f"a number in {brackets[0]}{low:g}, {high:g}{brackets[1]}")
    return Domain(text, lambda v: _is_number(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high))


def _integer(low: int) -> Domain:
    return Domain(f"an integer >= {low}", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low)


REAL = Domain("a finite number", _is_number)
BOOL = Domain("true or false", lambda v: isinstance(v, bool))
PATH = Domain("the path of a file", lambda v: isinstance(v, str) and v != "")
MODEL_REF = Domain("one of the recipe's models", lambda v: isinstance(v, (str, int)) and not isinstance(v, bool))

PARAMETER_DOMAINS: dict[str, Domain] = {
    "weight": REAL,
    "density": _interval(0, 1),
    "gamma": _interval(0, 1),
    "epsilon": _interval(0, 0.5, high_open=True),
    "lambda": REAL,
    "normalize": BOOL,
    "rescale": BOOL,
    "rescale_method": Domain("inverse or l1", lambda v: v in ("inverse", "l1")),
    "int8_mask": BOOL,
    "t": _interval(0, 1),
    "nuslerp_flatten": BOOL,
    "nuslerp_row_wise": BOOL,
    "filter_wise": BOOL,
    "sigma": REAL,
    "expert": MODEL_REF,
    "temperature": _interval(0, math.inf, low_open=True, high_open=True),
    "sensitivity": PATH,
    "calibration": PATH,
    "calibration_samples": _integer(1),
    "calibration_tokens": _integer(2),
}
# Parameters a model entry may set (others apply to the whole merge: top-level parameters only).
PER_MODEL = {"weight", "density", "gamma", "epsilon"}
# Parameters read once for the whole merge (not per tensor): no gradients or filters.
GLOBAL_ONLY = {"sigma", "expert", "sensitivity", "calibration", "calibration_samples", "calibration_tokens",
               "nuslerp_flatten", "nuslerp_row_wise", "filter_wise"}


def _check_parameters(recipe: MergeRecipe, where: str) -> None:
    """Every parameter is known to the method and each of its values lies in its domain."""
    known = KNOWN_PARAMS[recipe.method]
    scopes = [("parameters", None, recipe.parameters)] + [
        (f"models[{i}].parameters", entry, entry.parameters) for i, entry in enumerate(recipe.models)]
    for scope, entry, settings in scopes:
        for key, setting in settings.items():
            if key not in known:
                owner = f" of model {entry.ref}" if entry else ""
                raise RecipeError(f"{where}: parameter {key!r}{owner} is not used by {recipe.method}; known: {sorted(known)}")
            domain = PARAMETER_DOMAINS[key]
            if entry is not None and key not in PER_MODEL:
                raise RecipeError(f"{where}: {scope}.{key}: {key} is a setting of the whole merge, not of one model; "
                                  f"give it under the top-level parameters")
            if key in GLOBAL_ONLY:
                leaves = [setting]
            else:
                leaves = list(_leaves(setting, f"{where}: {scope}.{key}"))
            for value in leaves:
                if not domain.check(value):
                    raise InvalidParameter(f"{where}: {scope}.{key} must be {domain.text}, got {_short(value)}")
    expert = recipe.parameters.get("expert")
    others = [m.ref for m in recipe.models if m.ref != recipe.base]
    if recipe.method == "mediator" and expert is not None and str(expert) not in others:
        raise InvalidParameter(f"{where}: parameters.expert {_short(expert)} is not one of the models ({', '.join(others)})")


def _leaves(setting: Any, where: str):
    """The scalar values a setting can take: itself, each gradient point, each filter's value."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        yield setting
        return
    if not setting:
        raise RecipeError(f"{where}: an empty list is neither a gradient nor a filter list")
    if all(isinstance(e, dict) for e in setting):
        for cond in setting:
            extra = sorted(set(cond) - {"filter", "value"})
            if extra or "value" not in cond:
                raise RecipeError(f"{where}: a filter entry has exactly 'filter' (optional) and 'value', got {_short(cond)}")
            if not isinstance(cond.get("filter"), (str, type(None))):
                raise RecipeError(f"{where}: filter {_short(cond['filter'])} is not a string (a substring of tensor names or '*')")
            yield from _leaves(cond["value"], where)
        return
    for value in setting:
        if isinstance(value, (list, dict)):
            raise RecipeError(f"{where}: a gradient is a list of plain values; got {_short(setting)}")
        yield value


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
                expert = str(value("expert", default=others[0].ref))
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
                params["rank_pass"] = len(shape) == 1   # other tensors rank per row, inside a block
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
        with open(path, "rb") as f:
            data = f.read(MAX_SCORES_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"{where}: cannot read sensitivity file {path}: {e.strerror or e}") from None
    scores = safe_yaml(data, f"{where}: sensitivity file {path}", max_bytes=MAX_SCORES_BYTES)
    refs = [m.ref for m in recipe.models if m.ref != recipe.base]
    if not isinstance(scores, dict) or any(not isinstance(scores.get(r), dict) for r in refs):
        raise RecipeError(f"{where}: {path} must map every model ({', '.join(refs)}) to {{layer: score}}")
    for r in refs:
        for layer, value in scores[r].items():
            if not _is_number(value):
                raise InvalidParameter(f"{where}: sensitivity file {path}: score of model {r} layer {layer} must be "
                                       f"a finite number, got {_short(value)}")
    return {r: {str(k): float(v) for k, v in scores[r].items()} for r in refs}


def _meta(sources: Mapping[str, TensorSource], ref: str, name: str) -> TensorMeta:
    try:
        return sources[ref].meta(name)
    except TensorNotFound:
        raise TensorNotFound(f"tensor {name!r} is missing from model {ref} (present in the base / first model)") from None
