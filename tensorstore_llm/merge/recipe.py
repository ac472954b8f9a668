"""Merge recipes: mergekit's YAML format, parsed and turned into a validated Plan.

Accepted as mergekit writes them: ``models`` (each ``model`` + per-model ``parameters``),
``base_model``, ``merge_method``, global ``parameters``, ``dtype`` / ``out_dtype``,
``tokenizer_source`` (``base``, ``union`` or a model) or a ``tokenizer:`` block (``source``,
``tokens``, ``pad_to_multiple_of``; rules in ``merge/tokenizer.py``), ``slices`` (``merge/slices.py``),
and ``chat_template`` (a Jinja template, checked to parse, or ``auto``: the inputs' common
template), written into the output's ``tokenizer_config.json``. As mergekit, a parameter that
the method does not use but another method does (e.g. a per-model ``weight`` on ``model_stock``
or ``slerp``) is ignored with a RecipeWarning; a parameter no method knows is refused (a typo). A parameter may be a scalar, a gradient list
(interpolated by layer: layer i of L gets t = i / (L - 1), tensors outside the layers t = 0, as
mergekit does) or a list of ``{filter, value}`` conditions (first whose filter is a substring of
the tensor name, ``*`` or absent matches). Model references are store refs, Hugging Face
directories or hub repo ids. Not supported (refused with a one-line reason naming the key):
``modules``, chat templates by name (mergekit's bundled files).
Computation is fp32; ``out_dtype`` (else ``dtype``, else the models' dtype: where they differ, as in a
bf16 base with fp32 fine-tunes, their promoted dtype, as mergekit) is the output dtype.
With ``arithmetic="mergekit"`` (linear and the task-arithmetic family) the jobs instead use the
replay ops (``ops/replay.py``), which redo mergekit 0.1.5's operations in ``dtype``, rounding
where it rounds (e.g. bf16 task vectors).

Each method is an object of ``merge/methods/`` (its parameters and their domains, checks,
preparation and jobs); this module parses, checks every parameter against its method's
declaration; ``merge/planning.py`` walks the tensors into the Plan (its names are re-exported
here). Recipes are untrusted input, read by ``safe_yaml``; every
parameter is checked against its domain when the recipe is read, before any model is opened.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from ..dtypes import by_name
from ..errors import DTypeError, InvalidParameter, RecipeError, RecipeWarning
from .card import parse_chat_template
from .methods import all_methods, get_method, method_names
from .planning import (  # noqa: F401  (re-exported: the recipe's plan lives in planning.py)
    LAYER_RE,
    MERGEKIT_ARITHMETIC,
    effective_densities,
    evaluate,
    layer_position,
    plan_merge,
    prepare_merge,
)
from .safe_yaml import (  # noqa: F401 (re-exported)
    MAX_DEPTH,
    MAX_RECIPE_BYTES,
    RecipeLoader,
    read_recipe_file,
    safe_yaml,
    short,
)
from .tokenizer_settings import parse_tokenizer_settings

TOP_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source", "name",
            "tokenizer", "chat_template", "slices"}
UNSUPPORTED = {"modules": "multi-module recipes (modules:) are not supported"}

# Views of the method registry, for documentation and tests.
METHODS = method_names()
KNOWN_PARAMS = {m.name: set(m.parameters) for m in all_methods()}
# (method, key) -> Domain: a name may mean different things to different methods (slerp's t is a
# fraction in [0, 1], nearswap's a distance >= 0), so each method declares its own
PARAMETER_DOMAINS = {(m.name, key): param.domain for m in all_methods() for key, param in m.parameters.items()}


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
    chat_template: str | None = None   # a Jinja template, "auto", or None (keep the base's)
    slices: list | None = None         # slices.OutputSlice per output slice (``slices:``), else None
    slice_recipes: list | None = None  # one recipe per slice, over its sources' views (slices.py)
    tokenizer: Any = None              # tokenizer.TokenizerSpec (tokenizer_source / tokenizer:), else None


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
    if not isinstance(method, str) or method not in method_names():
        raise RecipeError(f"{where}: merge_method {method!r} is not supported; supported: {', '.join(method_names())}")
    chat_template = parse_chat_template(raw.get("chat_template"), where)
    entries = raw.get("models")
    slices = None
    if raw.get("slices") is not None:
        from .slices import parse_slices

        if entries:
            raise RecipeError(f"{where}: give either models or slices, not both")
        slices = parse_slices(raw["slices"], _ref, where)
        entries = list(dict.fromkeys(s.ref for out in slices for s in out.sources))
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise RecipeError(f"{where}: models must be a list of entries (- model: REF), got {type(entries).__name__} "
                          f"{short(entries)}")
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
    recipe = MergeRecipe(method, models, base, dict(params), out_dtype, raw, dtype, chat_template)
    recipe.tokenizer = parse_tokenizer_settings(raw, list(dict.fromkeys(([base] if base else []) + [m.ref for m in models])), where)
    _drop_ignored_parameters(recipe, where)
    if slices is not None:
        _split_slices(recipe, slices, where)
        return recipe
    get_method(method).check(recipe, where)
    _check_parameters(recipe, where)
    return recipe


def _split_slices(recipe: MergeRecipe, slices: list, where: str) -> None:
    """One recipe per slice (its sources as models, keyed by their layer views), each checked
    like a whole recipe."""
    from ..merge.methods.base import MergeMethod
    from .slices import slice_base

    method = get_method(recipe.method)
    if type(method).prepare is not MergeMethod.prepare:
        raise RecipeError(f"{where}: slices: {recipe.method} analyses whole models before merging; "
                          f"it cannot be combined with slices")
    recipe.slices, recipe.slice_recipes = slices, []
    for i, out in enumerate(slices):
        here = f"{where}: slices[{i}]"
        sub = MergeRecipe(recipe.method, [ModelEntry(s.key, s.parameters) for s in out.sources],
                          slice_base(out, recipe.base, here), {**recipe.parameters, **out.parameters},
                          recipe.out_dtype, recipe.raw, recipe.dtype, recipe.chat_template)
        _drop_ignored_parameters(sub, here)
        method.check(sub, here)
        _check_parameters(sub, here)
        recipe.slice_recipes.append(sub)


def _drop_ignored_parameters(recipe: MergeRecipe, where: str) -> None:
    """Parameters the method does not use but another method does: a RecipeWarning each, and
    dropped (mergekit ignores them). Unknown to every method: left for the check to refuse."""
    known = get_method(recipe.method).parameters
    elsewhere = {key for m in all_methods() for key in m.parameters}
    scopes = [(None, recipe.parameters)] + [(entry, entry.parameters) for entry in recipe.models]
    for entry, settings in scopes:
        for key in [k for k in settings if k not in known and k in elsewhere]:
            owner = f" of model {entry.ref}" if entry else ""
            warnings.warn(f"{where}: parameter {key!r}{owner} is not used by {recipe.method}; ignored (as mergekit does)",
                          RecipeWarning, stacklevel=3)
            del settings[key]


def reference_key(recipe: MergeRecipe, ref: str) -> str:
    """Where the recipe names model ``ref``, as a key path (``base_model``, ``models[1].model``,
    ``slices[0].sources[1].model``): the first place, for error messages; ``model {ref}`` if none."""
    def names(value) -> bool:
        value = value.get("model") if isinstance(value, dict) else value
        return value is not None and not isinstance(value, (dict, list, bool)) and str(value) == ref

    raw = recipe.raw if isinstance(recipe.raw, dict) else {}
    if names(raw.get("base_model")):
        return "base_model"
    for i, entry in enumerate(raw.get("models") or []):
        if names(entry):
            return f"models[{i}].model" if isinstance(entry, dict) else f"models[{i}]"
    for i, out in enumerate(raw.get("slices") or []):
        if not isinstance(out, dict):
            continue
        if names(out.get("base_model")):
            return f"slices[{i}].base_model"
        for j, src in enumerate(out.get("sources") or []):
            if names(src):
                return f"slices[{i}].sources[{j}].model"
    return f"model {ref}"


def _ref(value: Any, where: str) -> str:
    """A model reference: a string (an integer, as YAML reads a tag like ``2024``, is taken as text)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "" or not str(value).isprintable():
        raise RecipeError(f"{where}: expected a model reference (store tag / id, directory or hub repo), got {short(value)}")
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


def _check_parameters(recipe: MergeRecipe, where: str) -> None:
    """Every parameter is known to the method and each of its values lies in its domain."""
    method = get_method(recipe.method)
    known = method.parameters
    scopes = [("parameters", None, recipe.parameters)] + [
        (f"models[{i}].parameters", entry, entry.parameters) for i, entry in enumerate(recipe.models)]
    for scope, entry, settings in scopes:
        for key, setting in settings.items():
            if key not in known:
                owner = f" of model {entry.ref}" if entry else ""
                raise RecipeError(f"{where}: parameter {key!r}{owner} is not used by {recipe.method}; known: {sorted(known)}")
            param = known[key]
            if entry is not None and not param.per_model:
                raise RecipeError(f"{where}: {scope}.{key}: {key} is a setting of the whole merge, not of one model; "
                                  f"give it under the top-level parameters")
            leaves = list(_leaves(setting, f"{where}: {scope}.{key}")) if param.per_tensor else [setting]
            for value in leaves:
                if not param.domain.check(value):
                    raise InvalidParameter(f"{where}: {scope}.{key} must be {param.domain.text}, got {short(value)}")
    method.check_parameters(recipe, where)


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
                raise RecipeError(f"{where}: a filter entry has exactly 'filter' (optional) and 'value', got {short(cond)}")
            if not isinstance(cond.get("filter"), (str, type(None))):
                raise RecipeError(f"{where}: filter {short(cond['filter'])} is not a string (a substring of tensor names or '*')")
            yield from _leaves(cond["value"], where)
        return
    for value in setting:
        if isinstance(value, (list, dict)):
            raise RecipeError(f"{where}: a gradient is a list of plain values; got {short(setting)}")
        yield value
