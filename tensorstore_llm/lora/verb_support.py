"""What the store-level LoRA verbs (:mod:`.jobs`, :mod:`.svd_verbs`, :mod:`.combine`) share:
opening an adapter reference, the checks every verb makes before it works, and committing (and
exporting) the adapter a verb made, bound to its base.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..engine.options import RunOptions
from ..errors import InvalidParameter, OutputExists, RecipeError
from ..runs import resolve_input
from ..store.store import Artifact, Store
from .artifacts import (
    adapter_info,
    binding,
    commit_adapter,
    export_adapter,
    is_adapter_artifact,
    read_adapter_artifact,
    weight_names,
)
from .peft_format import LoraAdapter, PrefixAdapter, read_adapter

PREFIX_REFUSED = ("a prefix-tuning adapter adds key/value prefixes to attention and cannot be merged into "
                  "weights; load it with PEFT at inference instead")


@dataclass
class LoraResult:
    """What a LoRA verb made: artifacts (adapters and/or a checkpoint), an export path, a report."""

    artifacts: list[Artifact] = field(default_factory=list)
    output: str | None = None
    report: dict = field(default_factory=dict)


@dataclass
class OpenedAdapter:
    """An adapter with where it came from: its tensors as a source, its lineage entry and, for
    an artifact, the base it is bound to."""

    adapter: LoraAdapter | PrefixAdapter
    source: object
    lineage: dict
    bound: dict | None
    ref: str


def open_adapter_ref(store: Store, ref: str) -> OpenedAdapter:
    """Open an adapter artifact or PEFT directory (a pickled ``.bin`` adapter is refused).

    Example: ``open_adapter_ref(store, "math-lora").adapter.ranks()``.
    """
    if is_adapter_artifact(store, ref):
        adapter, artifact = read_adapter_artifact(store, ref)
        return OpenedAdapter(adapter, store.open(ref), {"id": artifact.id}, artifact.manifest.info.get("base"), ref)
    from ..io.hf_dir import HFCheckpointSource
    from .peft_format import WEIGHTS_FILE

    adapter = read_adapter(ref)
    # the engine reads the factors from the file, one module's at a time (neither hashed nor held whole)
    return OpenedAdapter(adapter, HFCheckpointSource(os.path.join(ref, WEIGHTS_FILE)),
                         {"external": {"type": "peft-adapter", "path": os.path.abspath(ref)}}, None, ref)


def lora_only(opened: OpenedAdapter, what: str) -> LoraAdapter:
    """The LoRA adapter of ``opened``; RecipeError naming the verb for a prefix-tuning adapter."""
    if isinstance(opened.adapter, PrefixAdapter):
        raise RecipeError(f"{opened.ref}: {what}: {PREFIX_REFUSED}")
    return opened.adapter


def validate_fits(adapter: LoraAdapter | PrefixAdapter, source, files: dict, where: str) -> None:
    """TensorNotFound / ShapeMismatch unless ``adapter`` fits the base ``source`` (a prefix-tuning
    adapter: the base's ``config.json`` among ``files``)."""
    if isinstance(adapter, PrefixAdapter):
        import json

        if "config.json" in files:
            with open(files["config.json"], encoding="utf-8") as f:
                adapter.validate_base(json.load(f))
        return
    adapter.validate_base({m.name: m.shape for m in source.metas()}, where=where)


def bound_of(store: Store, opened: OpenedAdapter, base: str | None) -> dict:
    """The binding an adapter derived from ``opened`` keeps (a directory adapter needs ``base``)."""
    if opened.bound is not None:
        return opened.bound
    if base is None:
        raise InvalidParameter(f"{opened.ref} is a directory, not an adapter artifact: give --base, the model it "
                               "belongs to, so the result can be bound to it")
    source, lineage, files = resolve_input(store, base)
    with source:
        validate_fits(opened.adapter, source, files, where=base)
        return binding(store, source, lineage, opened.adapter, files)


def finish(store: Store, adapter: LoraAdapter, bound: dict, *, parents, recipe, name, out_dir, report,
           resumed=()) -> LoraResult:
    """Commit ``adapter`` bound to ``bound`` and export it to ``out_dir`` if asked;
    ``report["resumed"]`` counts the tensors an interrupted earlier run had finished (``resumed``:
    staged factors; the adapter's own commit adds the tensors it resumed)."""
    keep = set(weight_names(adapter))
    bound = {**bound, "checksums": {k: v for k, v in (bound.get("checksums") or {}).items() if k in keep}}
    resumed = list(resumed)
    artifact = commit_adapter(store, adapter, info=adapter_info(adapter, bound), parents=parents, recipe=recipe,
                              name=name, resumed=resumed)
    out = _export_committed(store, artifact, adapter, out_dir) if out_dir else None
    return LoraResult([artifact], out, {**report, "resumed": len(resumed)})


def _export_committed(store: Store, artifact: Artifact, adapter: LoraAdapter, out_dir: str) -> str:
    """:func:`.artifacts.export_adapter` of ``artifact``, just committed from ``adapter``, written
    from the adapter in memory (the same tensors and config) instead of a second copy read back
    from the store: the factors are most of what a LoRA verb holds (89 MiB at 1 GB, r64)."""
    from .peft_format import write_adapter

    if not all(t.is_contiguous() for t in adapter.state_dict().values()):
        return export_adapter(store, artifact.id, out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise OutputExists(f"{out_dir} already exists and is not empty")
    return write_adapter(adapter, out_dir, overwrite=os.path.exists(out_dir))


def check_out_dir(out_dir: str | None) -> None:
    """OutputExists before any work when ``-o DIR`` exists and is not empty."""
    if out_dir and os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise OutputExists(f"{out_dir} already exists and is not empty")


def check_rank_energy(rank: int | None, energy: float | None, where: str, required: bool = True) -> None:
    """InvalidParameter unless at most one of ``rank`` (>= 1) and ``energy`` (in (0, 1]) is given
    (exactly one when ``required``)."""
    if rank is not None and energy is not None:
        raise InvalidParameter(f"{where}: give --rank or --energy, not both")
    if required and rank is None and energy is None:
        raise InvalidParameter(f"{where}: give --rank or --energy")
    if rank is not None and rank < 1:
        raise InvalidParameter(f"{where}: --rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise InvalidParameter(f"{where}: --energy must be in (0, 1], got {energy}")


def device_type(options: RunOptions) -> str:
    """The device type (``cpu`` / ``cuda``) a run with ``options`` computes on: part of the keys
    that let a killed run resume (results may differ between device types)."""
    from ..engine.devices import resolve_device

    return resolve_device(options.device).type


__all__ = ["PREFIX_REFUSED", "LoraResult", "OpenedAdapter", "bound_of", "check_out_dir", "check_rank_energy",
           "device_type", "finish", "lora_only", "open_adapter_ref", "validate_fits"]
