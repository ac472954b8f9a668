"""The store-level LoRA verbs behind ``tsllm lora``: import, merge, base check, resize and drop,
each producing artifacts bound to their base; extract and SVD initialisation live in
:mod:`.svd_verbs`, combination in :mod:`.combine`, and are re-exported here.

Model references (BASE, FT) are store refs, Hugging Face directories or hub repos; ADAPTER
references are ``lora`` artifacts or PEFT directories. An adapter artifact is applied only to
its own base (checksums of the weights it changes, see :mod:`.artifacts`) unless ``transfer``.
"""
from __future__ import annotations

import os

from ..engine.options import RunOptions
from ..errors import BaseMismatch, InvalidParameter
from ..runs import resolve_input
from ..store.store import Store
from .artifacts import adapter_info, binding, check_binding, commit_adapter
from .peft_format import read_adapter
from .svd_verbs import extract, svd_init
from .verb_support import (
    LoraResult,
    bound_of,
    check_out_dir,
    check_rank_energy,
    finish,
    lora_only,
    open_adapter_ref,
    validate_fits,
)


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
        validate_fits(adapter, source, files, where=base)
        bound = binding(store, source, lineage, adapter, files)
    artifact = commit_adapter(store, adapter, info=adapter_info(adapter, bound),
                              parents=[{**lineage, "role": "base"}],
                              source={"type": "peft-adapter", "path": os.path.abspath(adapter_dir)},
                              recipe={"op": "lora_import"}, name=name)
    return LoraResult([artifact], report={"describe": adapter.describe()})


def lora_merge(store: Store, base: str, adapter: str, *, scale: float = 1.0, transfer: bool = False,
               name: str | None = None, out_dir: str | None = None, max_shard_size="5G", keep_artifact: bool = False,
               options: RunOptions | None = None, **run_options):
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
    from .merge_setup import export_stored, merge_setup, write_merge

    opts = RunOptions.of(options, **run_options)
    with merge_setup(store, base, adapter, scale=scale, transfer=transfer, where=f"lora merge {adapter}") as setup:
        setup.release_adapter()
        transferred = setup.transferred
        result = write_merge(store, setup, setup.plan, out_dir=out_dir, keep_artifact=keep_artifact,
                             max_shard_size=max_shard_size, name=name, desc="lora merge", options=opts)
    result = export_stored(store, result, out_dir, options=opts, max_shard_size=max_shard_size)
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

    check_rank_energy(rank, energy, "lora resize", required=budget is None)
    check_out_dir(out_dir)
    if budget is not None and budget < 1:
        raise InvalidParameter(f"lora resize: --budget must be a positive parameter count, got {budget}")
    opened = open_adapter_ref(store, adapter)
    lora = lora_only(opened, "lora resize")
    if rank is not None:
        for k, m in lora.modules.items():
            if rank > min(m.A.shape[1], m.B.shape[0]):
                raise InvalidParameter(f"lora resize: rank {rank} for {k!r} is above min(out, in) = "
                                       f"{min(m.A.shape[1], m.B.shape[0])}")
    bound = bound_of(store, opened, base)
    opened.source.close()
    try:
        new, report = resize_adapter(lora, rank=rank, energy=energy, auto_budget=auto_budget, budget=budget)
    except ValueError as e:   # a budget below rank 1 everywhere
        raise InvalidParameter(f"lora resize: {e}") from None
    return finish(store, new, bound, parents=[{**opened.lineage, "role": "adapter"}],
                  recipe={"op": "lora_resize", "rank": rank, "energy": energy, "budget": budget,
                          "rank_pattern": "auto" if auto_budget else None},
                  name=name, out_dir=out_dir, report={"modules": report.modules, "totals": report.totals})


def drop(store: Store, adapter: str, *, lowest: int | None = None, modules: list[str] = (), base: str | None = None,
         name: str | None = None, out_dir: str | None = None) -> LoraResult:
    """AdapterDrop: the adapter without the LoRA of its lowest ``lowest`` layers and / or the named
    modules; the report gives the parameters removed.

    Example: ``drop(store, "math-lora", lowest=4, name="math-top")``.
    """
    from .adapters import drop_layers

    if lowest is not None and lowest < 0:
        raise InvalidParameter(f"lora drop: --layers must be >= 0, got {lowest}")
    check_out_dir(out_dir)
    opened = open_adapter_ref(store, adapter)
    lora = lora_only(opened, "lora drop")
    bound = bound_of(store, opened, base)
    opened.source.close()
    new, report = drop_layers(lora, lowest=lowest, modules=list(modules))
    return finish(store, new, bound, parents=[{**opened.lineage, "role": "adapter"}],
                  recipe={"op": "lora_drop", "lowest": lowest, "modules": sorted(modules)},
                  name=name, out_dir=out_dir, report={"modules": report.modules, "totals": report.totals})


__all__ = ["BaseMismatch", "LoraResult", "check_base", "drop", "extract", "import_adapter", "lora_merge",
           "open_adapter_ref", "resize", "svd_init"]
