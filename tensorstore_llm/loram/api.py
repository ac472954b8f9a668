"""``recover_adapter``: a PEFT adapter trained on a pruned model -> a ``lora`` artifact bound to the
full base (and a PEFT directory), ready for ``tsllm lora merge``."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import BaseMismatch, OutputExists, RecipeError, ShapeMismatch
from ..lora.artifacts import adapter_info, commit_adapter, weight_names
from ..lora.peft_format import LoraAdapter, PrefixAdapter, read_adapter, write_adapter
from ..runs import resolve_input
from ..store import Artifact, Store
from .recover import Recovery, recover


@dataclass
class RecoverResult:
    recovery: Recovery
    artifact: Artifact | None
    output: str | None


def recover_adapter(store: Store, adapter_dir: str, plan_ref: str, *, out_dir: str | None = None,
                    name: str | None = None, pruned: str | None = None, overwrite: bool = False) -> RecoverResult:
    """Recover ``adapter_dir`` (PEFT, trained on the model pruned by plan ``plan_ref``).

    Args:
        pruned: the checkpoint the adapter was trained on (the pruned model, or an aligned one
            imported as an artifact / directory); when given, the adapter must fit its shapes.
        out_dir: also write the recovered PEFT adapter directory there.
        name: tag of the new ``lora`` artifact.
    Returns:
        :class:`RecoverResult`: the artifact (kind ``lora``, info binding it to the full base,
        lineage: the plan and the adapter) and ``out_dir``. Nothing is written when a check fails.
    Example:
        >>> recover_adapter(store, "pruned-lora", "small-plan", out_dir="full-lora")   # doctest: +SKIP
    """
    from ..prune.api import load_plan

    plan, plan_artifact = load_plan(store, plan_ref)
    adapter = read_adapter(adapter_dir)
    if isinstance(adapter, PrefixAdapter):
        raise RecipeError(f"{adapter_dir}: a prefix-tuning adapter has no LoRA factors to recover")
    if pruned is not None:
        _check_fits(store, adapter, pruned)
    recovery = recover(adapter, plan)
    bound = _full_binding(store, plan, recovery.adapter)
    info = adapter_info(recovery.adapter, bound, pruning_plan=plan_artifact.id, recovered=True)
    parents = [{"id": plan_artifact.id, "role": "pruning_plan"},
               {"role": "adapter", "external": {"type": "peft-adapter", "path": os.path.abspath(adapter_dir)}}]
    if plan.base.get("id") and store.has(plan.base["id"]):
        parents.insert(0, {"id": plan.base["id"], "role": "base"})
    if out_dir and os.path.exists(out_dir) and not overwrite:
        raise OutputExists(f"{out_dir} already exists")
    artifact = commit_adapter(store, recovery.adapter, info=info, parents=parents, name=name,
                              recipe={"op": "loram_recover", "modules": recovery.actions})
    if out_dir:
        write_adapter(recovery.adapter, out_dir, overwrite=overwrite)
    return RecoverResult(recovery, artifact, out_dir)


def _full_binding(store: Store, plan, adapter: LoraAdapter) -> dict:
    """The lora binding to the plan's full base: the checksums of the weights the adapter
    changes (from the plan; other tensors, e.g. modules_to_save, from the base's manifest)."""
    names = weight_names(adapter)
    bound = plan.base.get("checksums") or {}
    checksums = {n: bound[n] for n in names if n in bound}
    rest = [n for n in names if n not in bound]
    if rest and plan.base.get("id") and store.has(plan.base["id"]):
        recorded = store.get(plan.base["id"]).manifest.checksums()
        checksums.update({n: recorded[n] for n in rest if n in recorded})
    return {"id": plan.base.get("id"), "external": plan.base.get("external"), "checksums": checksums}


def _check_fits(store: Store, adapter: LoraAdapter, pruned: str) -> None:
    source, _, _ = resolve_input(store, pruned)
    with source:
        shapes = {m.name: m.shape for m in source.metas()}
    try:
        adapter.validate_base(shapes, where=f"pruned checkpoint {pruned}")
    except ShapeMismatch as e:
        raise ShapeMismatch(f"{e} (the adapter was not trained on this pruned checkpoint)") from None


def check_plan_base(store: Store, plan_ref: str, base_ref: str) -> None:
    """BaseMismatch unless ``base_ref`` is the model the plan was made from (by checksums)."""
    from ..prune.api import load_plan, model_checksums
    from ..prune.plan import check_binding

    plan, _ = load_plan(store, plan_ref)
    checksums = model_checksums(store, base_ref, list(plan.base.get("checksums", {})))
    check_binding(plan, checksums, f"base {base_ref}")


__all__ = ["BaseMismatch", "RecoverResult", "check_plan_base", "recover_adapter"]
