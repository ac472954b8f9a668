"""The store-level LoRA verbs behind ``tsllm lora``: import / export, merge, extract, resize,
drop, combine and SVD initialisation, each producing artifacts bound to their base.

Model references (BASE, FT) are store refs, Hugging Face directories or hub repos; ADAPTER
references are ``lora`` artifacts or PEFT directories. An adapter artifact is applied only to
its own base (checksums of the weights it changes, see :mod:`.artifacts`) unless ``transfer``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import BaseMismatch, InvalidParameter, RecipeError
from ..runs import JobResult, export, resolve_input, run_plan
from ..store.store import Artifact, Store
from .artifacts import (DictSource, adapter_info, base_checksums, binding, check_binding, commit_adapter,
                        export_adapter, is_adapter_artifact, read_adapter_artifact)
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
    """Open an adapter artifact or PEFT directory (a pickled ``.bin`` adapter is refused)."""
    if is_adapter_artifact(store, ref):
        adapter, artifact = read_adapter_artifact(store, ref)
        return OpenedAdapter(adapter, store.open(ref), {"id": artifact.id}, artifact.manifest.info.get("base"), ref)
    from ..io.hf_dir import HFCheckpointSource
    from .peft_format import WEIGHTS_FILE

    adapter = read_adapter(ref)
    # the engine reads the factors from the file, one module's at a time (neither hashed nor held whole)
    return OpenedAdapter(adapter, HFCheckpointSource(os.path.join(ref, WEIGHTS_FILE)),
                         {"external": {"type": "peft-adapter", "path": os.path.abspath(ref)}}, None, ref)


def _lora_only(opened: OpenedAdapter, what: str) -> LoraAdapter:
    if isinstance(opened.adapter, PrefixAdapter):
        raise RecipeError(f"{opened.ref}: {what}: {PREFIX_REFUSED}")
    return opened.adapter


def _validate(adapter, source, files: dict, where: str) -> None:
    if isinstance(adapter, PrefixAdapter):
        import json

        if "config.json" in files:
            with open(files["config.json"], encoding="utf-8") as f:
                adapter.validate_base(json.load(f))
        return
    adapter.validate_base({m.name: m.shape for m in source.metas()}, where=where)


def import_adapter(store: Store, adapter_dir: str, base: str, *, name: str | None = None) -> LoraResult:
    """Store the PEFT adapter in ``adapter_dir`` (LoRA, DoRA or prefix tuning) as a ``lora``
    artifact bound to ``base``: its id when ``base`` is an artifact, and the checksums of every
    base weight the adapter changes. The adapter must fit the base (TensorNotFound /
    ShapeMismatch otherwise); ``.bin`` pickles are refused. Nothing is written on error.

    Example: ``import_adapter(store, "./math-lora", "base", name="math")``.
    """
    adapter = read_adapter(adapter_dir)
    source, lineage, files = resolve_input(store, base)
    with source:
        _validate(adapter, source, files, where=base)
        bound = binding(store, source, lineage, adapter, files)
    artifact = commit_adapter(store, adapter, info=adapter_info(adapter, bound),
                              parents=[{**lineage, "role": "base"}],
                              source={"type": "peft-adapter", "path": os.path.abspath(adapter_dir)},
                              recipe={"op": "lora_import"}, name=name)
    return LoraResult([artifact], report={"describe": adapter.describe()})


def lora_merge(store: Store, base: str, adapter: str, *, scale: float = 1.0, transfer: bool = False,
               name: str | None = None, out_dir: str | None = None, max_shard_size="5G", keep_artifact: bool = False,
               options=None, **run_options):
    """Merge a LoRA / DoRA adapter (artifact or PEFT directory) into ``base``, streamed, as a new
    checkpoint artifact, or with ``out_dir`` straight into a Hugging Face directory.

    W + s·B·A (DoRA: m·(W + s·B·A)/‖W + s·B·A‖) in fp32, one rounding: PEFT's
    ``merge_and_unload()``. An adapter artifact bound to another base is refused (BaseMismatch)
    before anything is computed unless ``transfer``; a transfer is recorded in the recipe and
    returned in ``analysis["transfer"]``.

    With ``out_dir`` the merged tensors are written once, into the directory (shards of
    ``max_shard_size``, the base's carried files, a model card naming the base and the adapter);
    the store keeps a tensorless ``export`` record of the lineage (tagged ``name``), as
    ``tsllm merge -o`` does (:func:`runs.run_plan_into_dir`). ``keep_artifact=True`` stores the
    checkpoint and exports it (two writes). ``options`` / ``run_options``: ``RunOptions``.

    Returns: the api ``JobResult`` (``artifact``: the merged checkpoint, or the export record;
    ``output``: the directory).
    Example: ``lora_merge(store, "base", "./my-adapter", out_dir="merged", max_memory="1G")``.
    """
    from ..engine.options import RunOptions
    from ..runs import run_plan_into_dir
    from .merge_setup import merge_setup

    opts = RunOptions.of(options, **run_options)
    with merge_setup(store, base, adapter, scale=scale, transfer=transfer, where=f"lora merge {adapter}") as setup:
        setup.release_adapter()
        transferred = setup.transferred
        if out_dir and not keep_artifact:
            result = run_plan_into_dir(store, setup.plan, out_dir, parents=setup.parents, recipe=setup.recipe,
                                       files=setup.files, max_shard_size=max_shard_size, name=name, desc="lora merge",
                                       options=opts)
        else:
            result = run_plan(store, setup.plan, kind="checkpoint", parents=setup.parents, recipe=setup.recipe,
                              files=setup.files, name=name, desc="lora merge", options=opts)
    if out_dir and keep_artifact and result.artifact is not None:
        export(store, result.artifact.id, out_dir, max_shard_size=max_shard_size,
               max_memory=opts.max_memory, progress=opts.progress)
        result = JobResult(result.estimate, result.artifact, out_dir, result.computed, result.skipped)
    result.analysis = {"transfer": transferred}
    return result


def check_base(store: Store, adapter: str, base: str) -> None:
    """BaseMismatch unless adapter artifact ``adapter`` was made for ``base``: the same artifact,
    or a base whose tensors (and, for a prefix-tuning adapter, ``config.json`` shape fields)
    match its binding. Reads only what the binding names.

    Example: ``check_base(store, "my-prefix", "./llama-3-8b")``.
    """
    opened = open_adapter_ref(store, adapter)
    opened.source.close()
    if opened.bound is None:
        raise InvalidParameter(f"{adapter} is a directory, not an adapter artifact: it has no recorded base to check")
    source, lineage, files = resolve_input(store, base)
    with source:
        mismatched = check_binding(store, opened.bound, source, lineage, where=adapter, files=files)
    if mismatched:
        from .artifacts import describe_base

        raise BaseMismatch(f"{adapter}: made for base {describe_base(opened.bound)}; {base} is another base: "
                           f"{len(mismatched)} of what the adapter depends on differ(s), e.g. {mismatched[0]}")


def _finish(store: Store, adapter: LoraAdapter, bound: dict, *, parents, recipe, name, out_dir, report,
            resumed=()) -> LoraResult:
    """Commit ``adapter`` bound to ``bound`` and export it to ``out_dir`` if asked;
    ``report["resumed"]`` counts the tensors an interrupted earlier run had finished (``resumed``:
    staged factors; the adapter's own commit adds the tensors it resumed)."""
    keep = {n for n in _names(adapter)}
    bound = {**bound, "checksums": {k: v for k, v in (bound.get("checksums") or {}).items() if k in keep}}
    resumed = list(resumed)
    artifact = commit_adapter(store, adapter, info=adapter_info(adapter, bound), parents=parents, recipe=recipe,
                              name=name, resumed=resumed)
    out = _export(store, artifact, adapter, out_dir) if out_dir else None
    return LoraResult([artifact], out, {**report, "resumed": len(resumed)})


def _export(store: Store, artifact: Artifact, adapter: LoraAdapter, out_dir: str) -> str:
    """:func:`.artifacts.export_adapter` of ``artifact``, just committed from ``adapter``, written
    from the adapter in memory (the same tensors and config) instead of a second copy read back
    from the store: the factors are most of what a LoRA verb holds (89 MiB at 1 GB, r64)."""
    from ..errors import OutputExists
    from .peft_format import write_adapter

    if not all(t.is_contiguous() for t in adapter.state_dict().values()):
        return export_adapter(store, artifact.id, out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise OutputExists(f"{out_dir} already exists and is not empty")
    return write_adapter(adapter, out_dir, overwrite=os.path.exists(out_dir))


def _names(adapter: LoraAdapter) -> list[str]:
    from .artifacts import weight_names

    return weight_names(adapter)


def _bound_of(store: Store, opened: OpenedAdapter, base: str | None) -> dict:
    """The binding an adapter derived from ``opened`` keeps (a directory adapter needs ``base``)."""
    if opened.bound is not None:
        return opened.bound
    if base is None:
        raise InvalidParameter(f"{opened.ref} is a directory, not an adapter artifact: give --base, the model it "
                               "belongs to, so the result can be bound to it")
    source, lineage, files = resolve_input(store, base)
    with source:
        _validate(opened.adapter, source, files, where=base)
        return binding(store, source, lineage, opened.adapter, files)


def resize(store: Store, adapter: str, *, rank: int | None = None, energy: float | None = None,
           auto_budget: bool = False, budget: int | None = None, base: str | None = None,
           name: str | None = None, out_dir: str | None = None) -> LoraResult:
    """DyLoRA-style resize of an adapter: the SVD of s·B·A through QR of the factors (no out x in
    matrix), truncated to ``rank`` / ``energy``, or per-module ranks under the parameter budget
    of rank ``rank`` everywhere (``auto_budget``). The report has each module's Eckart-Young
    relative error.

    Example: ``resize(store, "math-lora", rank=16, name="math-r16")``.
    """
    from .adapters import resize_adapter

    _check_rank_energy(rank, energy, "lora resize", required=budget is None)
    _check_out_dir(out_dir)
    if budget is not None and budget < 1:
        raise InvalidParameter(f"lora resize: --budget must be a positive parameter count, got {budget}")
    opened = open_adapter_ref(store, adapter)
    lora = _lora_only(opened, "lora resize")
    if rank is not None:
        for k, m in lora.modules.items():
            if rank > min(m.A.shape[1], m.B.shape[0]):
                raise InvalidParameter(f"lora resize: rank {rank} for {k!r} is above min(out, in) = "
                                       f"{min(m.A.shape[1], m.B.shape[0])}")
    bound = _bound_of(store, opened, base)
    opened.source.close()
    try:
        new, report = resize_adapter(lora, rank=rank, energy=energy, auto_budget=auto_budget, budget=budget)
    except ValueError as e:   # a budget below rank 1 everywhere
        raise InvalidParameter(f"lora resize: {e}") from None
    return _finish(store, new, bound, parents=[{**opened.lineage, "role": "adapter"}],
                   recipe={"op": "lora_resize", "rank": rank, "energy": energy, "budget": budget,
                           "rank_pattern": "auto" if auto_budget else None},
                   name=name, out_dir=out_dir, report={"modules": report.modules, "totals": report.totals})


def drop(store: Store, adapter: str, *, lowest: int | None = None, modules: list[str] = (), base: str | None = None,
         name: str | None = None, out_dir: str | None = None) -> LoraResult:
    """AdapterDrop: the adapter without the LoRA of its lowest ``lowest`` layers and / or the named
    modules; the report gives the parameters removed."""
    from .adapters import drop_layers

    if lowest is not None and lowest < 0:
        raise InvalidParameter(f"lora drop: --layers must be >= 0, got {lowest}")
    _check_out_dir(out_dir)
    opened = open_adapter_ref(store, adapter)
    lora = _lora_only(opened, "lora drop")
    bound = _bound_of(store, opened, base)
    opened.source.close()
    new, report = drop_layers(lora, lowest=lowest, modules=list(modules))
    return _finish(store, new, bound, parents=[{**opened.lineage, "role": "adapter"}],
                   recipe={"op": "lora_drop", "lowest": lowest, "modules": sorted(modules)},
                   name=name, out_dir=out_dir, report={"modules": report.modules, "totals": report.totals})


def _check_rank_energy(rank, energy, where: str, required: bool = True) -> None:
    if rank is not None and energy is not None:
        raise InvalidParameter(f"{where}: give --rank or --energy, not both")
    if required and rank is None and energy is None:
        raise InvalidParameter(f"{where}: give --rank or --energy")
    if rank is not None and rank < 1:
        raise InvalidParameter(f"{where}: --rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise InvalidParameter(f"{where}: --energy must be in (0, 1], got {energy}")


def _diff_parent(store: Store, ft: str, base: str | None) -> tuple[str, bool]:
    """(the base to extract ``ft`` against, whether ``ft`` is a diff artifact).

    A diff artifact or a delta-stored checkpoint (``tsllm diff`` / ``import --delta-of``) is
    read through the diff reader, its tensors rebuilt block by block from its parent, and its
    parent is the base by default. A diff is ``ft - parent``: a ``base`` other than its parent
    (by id, or by the checksums the diff was stored against) is refused with BaseMismatch. A
    delta-stored checkpoint is a whole model and may be compared with any base.
    """
    artifact = store.get(ft) if store is not None and not os.path.exists(ft) and store.has(ft) else None
    # diff.store.is_delta, without importing the diff package: it loads numba (~60 MiB, ~1 s),
    # needed only to decode deltas (a directory or a plain checkpoint artifact has none)
    if artifact is None or not isinstance(artifact.manifest.info.get("delta"), dict):
        if base is None:
            raise InvalidParameter(f"lora extract: give --base, the model {ft} was fine-tuned from (it is not a diff "
                                   "artifact or a delta-stored checkpoint, whose parent would be the base)")
        return base, False
    from ..diff.store import DeltaSection

    section = DeltaSection.from_info(artifact.manifest.info, f"artifact {artifact.short_id}")
    is_diff = artifact.kind == "diff"
    if base is None:
        return section.base_id, is_diff
    if is_diff:
        source, lineage, _ = resolve_input(store, base)
        with source:
            if lineage.get("id") != section.base_id:
                names = sorted(section.base_checksums)
                missing = [n for n in names if n not in set(source.keys())]
                have = {} if missing else base_checksums(store, source, lineage, names)
                differ = missing or [n for n in names if have[n] != section.base_checksums[n]]
                if differ:
                    raise BaseMismatch(f"lora extract: diff {artifact.short_id} was taken against artifact "
                                       f"{section.base_id[:12]}, and --base {base} differs in {len(differ)} of its "
                                       f"tensors (e.g. {differ[0]!r}); leave --base out to use the diff's parent")
    return base, is_diff


def extract(store: Store, ft: str, base: str | None = None, *, rank: int | None = None, energy: float | None = None,
            max_rank: int = 128, targets: list[str] | None = None, name: str | None = None,
            out_dir: str | None = None, seed: int = 0, svd: str = "auto", **executor_options) -> LoraResult:
    """A LoRA adapter of the fine-tune ``ft`` against ``base``, streamed per target module
    (:func:`.streamed.extract`, ``svd``: auto / exact / randomized), committed bound to ``base``.

    ``ft`` may be a diff artifact or a delta-stored checkpoint: its tensors are rebuilt block by
    block by the diff reader and ``base`` defaults to its parent (see :func:`_diff_parent`); the
    adapter equals the one extracted from the fine-tune and its base with the same seed. The
    factors are staged in the store and journaled, so a killed run resumes to the same artifact
    (``report["resumed"]``: tensors an earlier run had finished).

    Example: ``extract(store, "ft", "base", rank=64, name="ft-lora")``.
    """
    from ..engine.memory import release_free_heap
    from ..ops.lora_extract import SVD_CHOICES
    from .resumable import StagedFactorSink
    from .streamed import extract as run_extract

    _check_rank_energy(rank, energy, "lora extract")
    if svd not in SVD_CHOICES:
        raise InvalidParameter(f"lora extract: --svd must be one of {', '.join(SVD_CHOICES)}, got {svd!r}")
    _check_out_dir(out_dir)
    base, is_diff = _diff_parent(store, ft, base)
    base_src, base_lineage, _ = resolve_input(store, base)
    ft_src, ft_lineage, _ = resolve_input(store, ft)
    key = ("lora_extract", base_src.identity, ft_src.identity, rank, energy, max_rank, targets, seed, svd,
           _device_type(executor_options))
    with base_src, ft_src, StagedFactorSink(store, key) as sink:
        ex = run_extract(base_src, ft_src, rank=rank, energy=energy, max_rank=max_rank, targets=targets, seed=seed,
                         sink=sink, svd=svd, **executor_options)
        release_free_heap()   # the factors' read-back left ~30 MiB of freed buffers in the heap (1 GB, r64)
        bound = binding(store, base_src, base_lineage, ex.adapter)
        return _finish(store, ex.adapter, bound,
                       parents=[{**base_lineage, "role": "base"}, {**ft_lineage, "role": "diff" if is_diff else "finetuned"}],
                       recipe={"op": "lora_extract", "rank": rank, "energy": energy,
                               "max_rank": max_rank if energy else None, "seed": seed, "svd": svd},
                       name=name, out_dir=out_dir, report={"modules": ex.modules, "totals": ex.totals},
                       resumed=sink.resumed)


def _check_out_dir(out_dir: str | None) -> None:
    """OutputExists before any work when ``-o DIR`` exists and is not empty."""
    if out_dir and os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        from ..errors import OutputExists

        raise OutputExists(f"{out_dir} already exists and is not empty")


def _device_type(options: dict) -> str:
    from ..engine.devices import resolve_device

    return resolve_device(options.get("device", "auto")).type


def svd_init(store: Store, base: str, *, rank: int, method: str = "pissa", experts: int = 1,
             alpha: float | None = None, targets: list[str] | None = None, name: str | None = None,
             out_dir: str | None = None, **executor_options) -> LoraResult:
    """PiSSA / GOAT initialisation: a residual-base checkpoint artifact (targets W0 - s·B·A in
    fp32) and the adapter(s) bound to it, so residual + adapter == W0 to fp32 rounding.

    The factors are staged in the store and journaled, the residual streams like any checkpoint
    job and each adapter's commit is keyed by its content, so a killed run resumes to the same
    artifacts (``report["resumed"]``: tensors an earlier run had finished).

    Returns: artifacts = [residual base, adapter (or one per GOAT expert)].
    """
    from .resumable import StagedFactorSink
    from .streamed import residual_plan, stacked_factors
    from .streamed import svd_init as run_init

    if method not in ("pissa", "goat"):
        raise InvalidParameter(f"lora init: --method must be pissa or goat, got {method!r}")
    if rank < 1:
        raise InvalidParameter(f"lora init: --rank must be >= 1, got {rank}")
    _check_out_dir(out_dir)
    source, lineage, files = resolve_input(store, base)
    key = ("lora_init", source.identity, rank, method, experts, alpha, targets, _device_type(executor_options))
    with source, StagedFactorSink(store, key) as sink:
        adapters = run_init(source, rank=rank, method=method, experts=experts, alpha=alpha, targets=targets, sink=sink,
                            **executor_options)
        resumed = list(sink.resumed)
        plan = residual_plan(source, adapters, DictSource(stacked_factors(adapters)))
        recipe = {"op": "lora_init", "method": method, "rank": rank, "experts": len(adapters), "alpha": alpha}
        done = run_plan(store, plan, kind="checkpoint", parents=[{**lineage, "role": "base"}], recipe=recipe,
                        files=files, name=f"{name}-residual" if name else None, desc=f"lora init {method}",
                        **executor_options)
        residual = done.artifact
        resumed += done.skipped
        out = LoraResult([residual], output=out_dir, report={"experts": len(adapters), "rank": rank})
        with store.open(residual.id) as res_src:
            for e, ad in enumerate(adapters):
                bound = binding(store, res_src, {"id": residual.id}, ad)
                tag = (name if len(adapters) == 1 else f"{name}-expert{e}") if name else None
                art = commit_adapter(store, ad, info=adapter_info(ad, bound), parents=[{"id": residual.id, "role": "base"}],
                                     recipe={**recipe, "expert": e}, name=tag, resumed=resumed)
                out.artifacts.append(art)
                if out_dir:
                    export_adapter(store, art.id, out_dir if len(adapters) == 1 else os.path.join(out_dir, f"expert-{e}"))
    out.report["resumed"] = len(resumed)
    return out


__all__ = ["import_adapter", "check_base", "lora_merge", "resize", "drop", "extract", "svd_init", "open_adapter_ref",
           "LoraResult", "BaseMismatch"]
