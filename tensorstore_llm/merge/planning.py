"""Recipe -> Plan: every output tensor of a parsed merge recipe as a job with its own resolved
parameters (scalar, gradient by layer position, or filter list), validated before any row is read.

``plan_merge`` walks the tensors and asks the recipe's method (``merge/methods/``) for each job;
``prepare_merge`` first runs the method's preparation (statistics streamed by the engine);
``evaluate`` / ``layer_position`` are mergekit's rules for a parameter's value at one tensor.
Parsing and checking the YAML is ``merge/recipe.py``'s part.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..dtypes import by_name
from ..engine.plan import Plan, TensorJob, check_agreement
from ..errors import DTypeError, RecipeError, TensorNotFound
from ..io.base import TensorMeta, TensorSource
from ..ops.registry import get_op
from ..ops.replay import REPLAY_OF
from .methods import MergeInputs, Prepared, TensorSlot, all_methods, get_method

if TYPE_CHECKING:
    from .recipe import MergeRecipe, ModelEntry

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
MERGEKIT_ARITHMETIC = tuple(m.name for m in all_methods() if m.replayable)


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


def plan_merge(recipe: MergeRecipe, sources: Mapping[str, TensorSource], where: str = "recipe",
               averaged_layers=None, arithmetic: str = "fp32", sensitivity: dict | None = None, *,
               state: Any = None, names=None, positions: Mapping[str, float] | None = None) -> Plan:
    """Every output tensor as a job with its own resolved parameters, validated up front.

    ``sources`` maps each model reference of the recipe (and the base) to an open TensorSource.
    ``state`` is what the method's ``prepare`` found (see ``prepare_merge``); without it
    the method plans from ``averaged_layers(layer_key) -> bool`` (Mediator's decision) or
    ``sensitivity`` ({model ref: {layer key: score}}, Sens-Merging's scores; else the recipe's
    ``sensitivity`` file). ``arithmetic="mergekit"`` plans the replay ops (``ops/replay.py``),
    computing in the recipe's ``dtype`` (default: the models' dtype) instead of fp32, for
    bit-exact comparison with mergekit.
    """
    if recipe.slices:
        from .slices import plan_slices

        def plan_one(sub, views, slice_names, slice_positions):
            return plan_merge(sub, views, where, averaged_layers, arithmetic, sensitivity, state=state,
                              names=slice_names, positions=slice_positions)
        jobs, views = plan_slices(recipe, recipe.slice_recipes, sources, plan_one, where)
        return Plan(jobs, views)
    method = get_method(recipe.method)
    if arithmetic not in ("fp32", "mergekit"):
        raise RecipeError(f"{where}: arithmetic must be fp32 or mergekit, got {arithmetic!r}")
    if arithmetic == "mergekit" and not method.replayable:
        raise RecipeError(f"{where}: mergekit arithmetic is replayed for {', '.join(MERGEKIT_ARITHMETIC)}; "
                          f"not for {recipe.method} (use the default fp32 arithmetic)")
    if state is None:
        state = method.state(recipe, where, {"averaged_layers": averaged_layers, "sensitivity": sensitivity})
    base = recipe.base
    others = [m for m in recipe.models if m.ref != base]
    first = base if base is not None else recipe.models[0].ref
    names = list(sources[first].keys()) if names is None else list(names)
    layers = {int(m.group(1)) for n in names for m in [LAYER_RE.search(n)] if m}
    num_layers = max(layers) + 1 if layers else 0
    jobs = []
    for name in names:
        t = positions[name] if positions is not None else layer_position(name, num_layers)
        metas = {ref: _meta(sources, ref, name) for ref in dict.fromkeys([first, *(m.ref for m in recipe.models)])}
        in_dtype = input_dtype(name, metas, sources, where)
        shape = metas[first].shape
        out_dtype = recipe.out_dtype if recipe.out_dtype and by_name(in_dtype).is_float else in_dtype

        def value(key, entry=None, default=None, name=name, t=t):
            return _param(recipe, entry, key, name, t, default, where)

        spec = method.job(recipe, TensorSlot(name, shape, t, base, recipe.models, others, value, where), state)
        op_name, compute_dtype = spec.op, "float32"
        if arithmetic == "mergekit" and by_name(in_dtype).is_float:
            if spec.op not in REPLAY_OF:
                raise RecipeError(f"{where}: tensor {name!r}: op {spec.op!r} has no mergekit replay "
                                  f"(replayed: {', '.join(REPLAY_OF)})")
            op_name, compute_dtype = REPLAY_OF[spec.op], recipe.dtype or in_dtype
        op = get_op(op_name)
        job_params = op.make_params(spec.params, f"{where}: tensor {name!r}")
        if hasattr(job_params, "validate_inputs"):
            counts = {role: len(refs) if isinstance(refs, tuple) else 1 for role, refs in spec.roles}
            try:
                job_params.validate_inputs(counts)
            except ValueError as e:
                raise RecipeError(f"{where}: tensor {name!r}: {e}") from None
        jobs.append(TensorJob(TensorMeta(name, shape, out_dtype), op_name, spec.roles, job_params, compute_dtype))
    return Plan(jobs, dict(sources))


def input_dtype(name: str, metas: Mapping[str, TensorMeta], sources: Mapping[str, TensorSource], where: str) -> str:
    """The dtype the inputs of one output tensor have together, as mergekit 0.1.5 reads them.

    The shapes must agree (else ShapeMismatch). Float inputs of different dtypes are merged as
    mergekit merges them: each input is cast to the recipe's ``dtype`` when it names one, else
    to the inputs' promoted dtype (``torch.promote_types``: bf16 with fp32 is fp32, bf16 with
    fp16 is fp32), which is also the output's dtype unless ``out_dtype`` / ``dtype`` is set.
    A mix with a non-float input (an integer buffer) has no such meaning: DTypeError naming
    the recipe, the tensor, both inputs with their dtypes and what to do.
    """
    items = list(metas.items())
    check_agreement(name, [(key, TensorMeta(meta.name, meta.shape, items[0][1].dtype)) for key, meta in items],
                    sources, f"{where} (models of different shapes, e.g. vocabulary sizes, cannot be merged)")
    first_key, first = items[0]
    promoted = by_name(first.dtype)
    for key, meta in items[1:]:
        dtype = by_name(meta.dtype)
        if dtype.name == promoted.name:
            continue
        if not (dtype.is_float and promoted.is_float):
            raise DTypeError(f"{where}: tensor {name!r} is {meta.dtype} in {_input(sources, key)} but {first.dtype} in "
                             f"{_input(sources, first_key)}; a merge casts float inputs to one dtype, and a "
                             f"non-float tensor has no cast that keeps its values: store it with one dtype "
                             f"in every model (tsllm convert --dtype)")
        promoted = by_name(str(torch.promote_types(promoted.torch, dtype.torch)))
    return promoted.name


def prepare_merge(recipe: MergeRecipe, sources: Mapping[str, TensorSource], files: Mapping[str, dict], where: str,
                  options, arithmetic: str = "fp32") -> tuple[Plan, Prepared]:
    """The method's preparation (streamed under ``options``, a RunOptions), then the validated plan.

    Returns:
        (Plan, Prepared): the plan and what the preparation found (its ``record`` belongs in the
        artifact's recipe record, its ``analysis`` is shown to the user).
    Example:
        >>> plan, prepared = prepare_merge(recipe, sources, files, "ties.yaml", RunOptions())  # doctest: +SKIP
    """
    method = get_method(recipe.method)

    def validate(state):
        return plan_merge(recipe, sources, where, arithmetic=arithmetic, state=state)

    prepared = method.prepare(recipe, MergeInputs(sources, files, where, validate), options)
    plan = plan_merge(recipe, sources, where, arithmetic=arithmetic, state=prepared.state)
    densities = effective_densities(plan)
    if densities:
        prepared.record["effective_density"] = densities
    return plan, prepared


def effective_densities(plan: Plan) -> dict[str, list[float]]:
    """Per output tensor of a magnitude-sparsified merge (TIES, breadcrumbs), the share of each
    model's task vector kept: exact, since the trims keep exactly their count. Random trims (DARE,
    DELLA) keep a seeded draw whose expected share is the density: not listed."""
    from ..ops.sparsify import kept_counts

    found = {}
    for job in plan.jobs:
        params = job.params
        if getattr(params, "sparsification", None) not in ("magnitude", "magnitude_outliers"):
            continue
        numel = job.output.numel
        counts = kept_counts(params, numel)
        if numel and any(c != numel for c in counts):
            found[job.output.name] = [c / numel for c in counts]
    return found


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


def _meta(sources: Mapping[str, TensorSource], ref: str, name: str) -> TensorMeta:
    try:
        return sources[ref].meta(name)
    except TensorNotFound:
        raise TensorNotFound(f"tensor {name!r} is missing from model {ref} (present in the base / first model)") from None


def _input(sources: Mapping[str, TensorSource], ref: str) -> str:
    path = getattr(sources[ref], "path", None)
    return f"input {ref} ({path})" if path else f"input {ref}"
