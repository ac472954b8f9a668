"""mergekit's ``slices:``: the output's layers listed slice by slice, each slice merging the
same number of layers from one or more sources (``model`` + ``layer_range: [start, stop)`` +
optional ``parameters``), with optional per-slice ``parameters`` and ``base_model``. With
``passthrough`` and one source per slice this builds the "frankenmerge" (e.g. depth up-scaling:
layers [0, 24) then [8, 32) of one model); overlapping ranges across slices are how those
repeat layers, so they are allowed, as in mergekit, even the same range of the same model twice.

As mergekit (``plan.py``): output layer ``offset + i`` of a slice merges layer ``start_j + i``
of each source j, with gradients interpolated over the slice (t = i / (n - 1), 1 for a one-layer
slice); tensors outside the layers (``embed`` tensors before them, the rest after them: final
norm, lm_head) are merged from the first slice's sources (embeddings) or the last slice's
(the rest) at t = 0 with that slice's parameters. The output's ``config.json`` gets
``num_hidden_layers`` and its per-layer lists (e.g. ``layer_types``) for the new depth.

Each slice is planned as a recipe of its own over views of the sources that rename their
layers (:class:`LayerView`), so every method works unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import RecipeError, TensorNotFound

LAYER_RE = re.compile(r"(^|\.)layers\.(\d+)\.")


@dataclass
class SliceSource:
    ref: str
    start: int
    stop: int
    parameters: dict = field(default_factory=dict)
    slice_index: int = 0

    @property
    def key(self) -> str:
        """The plan's source key of this source's view: unique per slice, since self-stacking
        recipes list the same model and range in several slices, each renumbered differently."""
        return f"{self.ref}#slices[{self.slice_index}].layers[{self.start}:{self.stop}]"


@dataclass
class OutputSlice:
    sources: list[SliceSource]
    parameters: dict
    base: str | None

    @property
    def length(self) -> int:
        return self.sources[0].stop - self.sources[0].start


def parse_slices(value: Any, ref_of, where: str) -> list[OutputSlice]:
    """The ``slices`` list, checked for shape: each slice has sources, each source a model and a
    ``layer_range`` [start, stop) with 0 <= start < stop, all sources of a slice equally long."""
    if not isinstance(value, list) or not value:
        raise RecipeError(f"{where}: slices must be a non-empty list of {{sources: [...]}}")
    slices = []
    for i, entry in enumerate(value):
        here = f"{where}: slices[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
            raise RecipeError(f"{here} needs a non-empty 'sources' list")
        extra = sorted(set(entry) - {"sources", "parameters", "base_model", "residual_weight"})
        if extra:
            raise RecipeError(f"{here} has unknown key(s) {extra}; known: sources, parameters, base_model")
        if entry.get("residual_weight") is not None:
            raise RecipeError(f"{here}.residual_weight is not supported")
        sources = []
        for j, src in enumerate(entry["sources"]):
            spot = f"{here}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src:
                raise RecipeError(f"{spot} needs a 'model' reference")
            extra = sorted(set(src) - {"model", "layer_range", "parameters"})
            if extra:
                raise RecipeError(f"{spot} has unknown key(s) {extra}; known: model, layer_range, parameters")
            span = src.get("layer_range")
            if (not isinstance(span, list) or len(span) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in span)
                    or not 0 <= span[0] < span[1]):
                raise RecipeError(f"{spot}.layer_range must be [start, stop) with 0 <= start < stop, got {span!r}")
            params = src.get("parameters") or {}
            if not isinstance(params, dict):
                raise RecipeError(f"{spot}.parameters must be a mapping")
            sources.append(SliceSource(ref_of(src["model"], f"{spot}.model"), span[0], span[1], dict(params), i))
        for j, src in enumerate(sources[1:], 1):
            if src.stop - src.start != sources[0].stop - sources[0].start:
                raise RecipeError(f"{here}.sources[{j}] ({src.ref}) layer_range [{src.start}, {src.stop}) spans "
                                  f"{src.stop - src.start} layer(s), but sources[0] ({sources[0].ref}) "
                                  f"[{sources[0].start}, {sources[0].stop}) spans {sources[0].stop - sources[0].start}: "
                                  f"every source of a slice must span the same number of layers")
        if len({s.key for s in sources}) != len(sources):
            raise RecipeError(f"{here}: a source is listed twice ({[s.key for s in sources]})")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise RecipeError(f"{here}.parameters must be a mapping")
        base = entry.get("base_model")
        slices.append(OutputSlice(sources, dict(params), ref_of(base, f"{here}.base_model") if base is not None else None))
    return slices


def slice_base(out: OutputSlice, base: str | None, where: str) -> str | None:
    """The plan key of a slice's base: the source that is the (slice's or recipe's) base model."""
    base = out.base or base
    if base is None:
        return None
    keys = [s.key for s in out.sources if s.ref == base]
    if not keys:
        raise RecipeError(f"{where}: base_model {base} is not among this slice's sources "
                          f"({', '.join(s.ref for s in out.sources)})")
    return keys[0]


class LayerView:
    """A source seen through a slice: output names (layers renumbered) -> the source's names."""

    def __init__(self, source, renames: Mapping[str, str], note: str):
        self.source, self._renames = source, dict(renames)
        self.identity = f"{source.identity}|{note}"
        self.path = getattr(source, "path", None)

    def _name(self, name: str) -> str:
        if name not in self._renames:
            raise TensorNotFound(f"tensor {name!r} is not in this slice of {self.path or 'the model'}")
        return self._renames[name]

    def keys(self) -> list[str]:
        return list(self._renames)

    def meta(self, name: str):
        return dataclasses.replace(self.source.meta(self._name(name)), name=name)

    def read(self, name: str):
        return self.source.read(self._name(name))

    def read_rows(self, name: str, start: int, stop: int):
        return self.source.read_rows(self._name(name), start, stop)

    def preferred_rows(self, name: str) -> int:
        rows = getattr(self.source, "preferred_rows", None)
        return rows(self._name(name)) if rows else 1

    def close(self) -> None:
        """Nothing: the underlying source belongs to the caller."""


def _layer_of(name: str) -> int | None:
    match = LAYER_RE.search(name)
    return int(match.group(2)) if match else None


def _renamed(name: str, layer: int) -> str:
    return LAYER_RE.sub(lambda m: f"{m.group(1)}layers.{layer}.", name, count=1)


def plan_slices(recipe, slice_recipes, sources: Mapping[str, Any], plan_one, where: str):
    """Jobs of every slice (``plan_one(sub_recipe, views, names, positions) -> Plan``) and the
    views they read, as (jobs, views); RecipeError for a layer_range past a model's layers."""
    depth = {}
    for ref in dict.fromkeys(s.ref for out in recipe.slices for s in out.sources):
        layers = {_layer_of(n) for n in sources[ref].keys()} - {None}
        depth[ref] = max(layers) + 1 if layers else 0
    for i, out in enumerate(recipe.slices):   # every range first: no slice is planned before all are known good
        for j, src in enumerate(out.sources):
            if src.stop > depth[src.ref]:
                raise RecipeError(f"{where}: slices[{i}].sources[{j}].layer_range [{src.start}, {src.stop}) is out of range: "
                                  f"{src.ref} has {depth[src.ref]} layers")
    jobs, views, offset = [], {}, 0
    for i, (out, sub) in enumerate(zip(recipe.slices, slice_recipes)):
        slice_views = {}
        for src in out.sources:
            renames = {}
            for name in sources[src.ref].keys():
                layer = _layer_of(name)
                if layer is not None and src.start <= layer < src.stop:
                    renames[_renamed(name, offset + layer - src.start)] = name
                elif layer is None and ((i == 0 and "embed" in name) or (i == len(recipe.slices) - 1 and "embed" not in name)):
                    renames[name] = name
            slice_views[src.key] = LayerView(sources[src.ref], renames, f"layers[{src.start}:{src.stop}]->{offset}")
        first = sub.base or sub.models[0].ref
        names = slice_views[first].keys()
        n = out.length
        positions = {}
        for name in names:
            layer = _layer_of(name)
            positions[name] = 0.0 if layer is None else ((layer - offset) / (n - 1) if n > 1 else 1.0)
        jobs += plan_one(sub, slice_views, names, positions).jobs
        views.update(slice_views)
        offset += n
    return jobs, views


def output_depth(recipe) -> int:
    return sum(out.length for out in recipe.slices)


def with_depth(files: dict, recipe, where: str) -> dict:
    """Carried files with ``config.json`` rewritten for the sliced depth: ``num_hidden_layers``
    and every per-layer list (as long as the base's layer count) remapped to the output's layers
    (each output layer takes its first source's entry)."""
    if not getattr(recipe, "slices", None) or "config.json" not in files:
        return files
    entry = files["config.json"]
    try:
        if not isinstance(entry, bytes):
            with open(entry, "rb") as f:
                entry = f.read()
        config = json.loads(entry)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{where}: slices: cannot read config.json: {e}") from None
    old = config.get("num_hidden_layers")
    origin = [src.start + i for out in recipe.slices for src in out.sources[:1] for i in range(out.length)]
    for key, value in list(config.items()):
        if isinstance(value, list) and isinstance(old, int) and len(value) == old and key != "architectures":
            config[key] = [value[k] if k < len(value) else value[-1] for k in origin]
    config["num_hidden_layers"] = len(origin)
    return {**files, "config.json": json.dumps(config, indent=2).encode()}
