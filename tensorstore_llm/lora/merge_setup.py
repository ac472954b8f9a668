"""What every streamed LoRA merge sets up before it runs: the adapter and the base opened, the
adapter's binding checked (or the transfer recorded), the plain merge plan, the lineage and the
recipe record; and how the merged checkpoint is written (into the store, or once, straight into
a directory) and exported. Shared by :func:`.jobs.lora_merge`, :func:`.qlora.qlora_merge` and the
merges of :mod:`.combine`.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..engine.options import RunOptions
from ..engine.plan import Plan
from ..io.base import TensorSource
from .peft_format import LoraAdapter


@dataclass
class MergeSetup:
    """The opened inputs of one LoRA merge and what is planned from them.

    ``plan`` is :func:`.plans.plan_lora_merge` of the base and the adapter; ``parents`` and
    ``recipe`` are the lineage and recipe record of the artifact it makes; ``transferred`` is the
    transfer record when an adapter bound to another base was allowed (else None).
    """

    opened: object          # verb_support.OpenedAdapter: the factors are read through opened.source
    lora: LoraAdapter | None
    source: TensorSource
    files: dict
    plan: Plan
    parents: list[dict]
    recipe: dict
    transferred: dict | None

    def release_adapter(self) -> None:
        """Let go of the parsed adapter (the plan reads the factors through ``opened.source``)."""
        self.opened.adapter = self.lora = None


@contextlib.contextmanager
def merge_setup(store, base: str, adapter: str, *, scale: float, transfer: bool, where: str,
                recipe_fields: dict | None = None,
                check_source: Callable[[TensorSource], None] | None = None) -> Iterator[MergeSetup]:
    """Open ``adapter`` (artifact or PEFT directory) and ``base``, check the binding and plan the merge.

    Args:
        where: names the job in errors (e.g. ``"lora merge ./my-lora"``).
        recipe_fields: entries of the recipe record between ``scale`` and ``adapter``.
        check_source: called with the open base before anything else is read (raises to refuse it).
    Yields:
        a :class:`MergeSetup`; both sources are closed when the block ends.
    Raises:
        RecipeError for a prefix-tuning adapter; BaseMismatch for an adapter artifact bound to
        another base unless ``transfer``.
    Example:
        >>> with merge_setup(store, "base", "./my-lora", scale=1.0, transfer=False,   # doctest: +SKIP
        ...                  where="lora merge ./my-lora") as setup:
        ...     run_plan(store, setup.plan, kind="checkpoint", parents=setup.parents, recipe=setup.recipe)
    """
    from ..runs import resolve_input
    from .artifacts import check_binding, refuse_other_base
    from .plans import plan_lora_merge
    from .verb_support import lora_only, open_adapter_ref

    refuse_non_adapter(store, adapter, where)
    opened = open_adapter_ref(store, adapter)
    lora = lora_only(opened, "lora merge")
    source, lineage, files = resolve_input(store, base)
    with source, opened.source:
        if check_source is not None:
            check_source(source)
        transferred = None
        if opened.bound is not None:
            mismatched = check_binding(store, opened.bound, source, lineage, where=where)
            transferred = refuse_other_base(mismatched, opened.bound, base, where=where, transfer=transfer)
        plan = plan_lora_merge(source, lora, opened.source, scale=scale, where=where)
        parents = [{**lineage, "role": "base"}, {**opened.lineage, "role": "adapter"}]
        recipe = {"op": "lora_merge", "scale": scale, **(recipe_fields or {}), "adapter": lora.describe()}
        if transferred:
            recipe["transfer"] = transferred
        yield MergeSetup(opened, lora, source, files, plan, parents, recipe, transferred)


def refuse_non_adapter(store, adapter: str, where: str) -> None:
    """FormatError (exit 4) where ``adapter`` names a store artifact of another kind (a
    checkpoint) or a model checkpoint directory instead of a LoRA adapter, saying which it is."""
    from ..errors import FormatError
    from .artifacts import KIND
    from .peft_format import CONFIG_FILE

    remedy = ("give a lora artifact (tsllm lora import / lora extract) or a PEFT adapter directory "
              f"(with {CONFIG_FILE})")
    if store is not None and not os.path.exists(adapter) and store.has(adapter):
        artifact = store.get(adapter)
        if artifact.kind != KIND:
            raise FormatError(f"{where}: ADAPTER {adapter!r} is a {artifact.kind} artifact ({artifact.short_id}) "
                              f"of the store, not a LoRA adapter; {remedy}")
    elif (os.path.isdir(adapter) and not os.path.isfile(os.path.join(adapter, CONFIG_FILE))
          and os.path.isfile(os.path.join(adapter, "config.json"))):
        raise FormatError(f"{where}: ADAPTER {adapter} is a model checkpoint directory (config.json, no "
                          f"{CONFIG_FILE}), not a LoRA adapter; {remedy}")


def write_merge(store, setup: MergeSetup, plan: Plan, *, out_dir: str | None, keep_artifact: bool, max_shard_size,
                name: str | None, desc: str, options: RunOptions):
    """Stream ``plan`` (the setup's plan, or one made from it) with the setup's lineage, recipe and
    carried files: with ``out_dir`` and not ``keep_artifact``, once, straight into the directory
    (:func:`runs.run_plan_into_dir`: the store keeps a tensorless ``export`` record tagged
    ``name``); else into a checkpoint artifact tagged ``name`` (:func:`export_stored` then
    exports it). Returns the api ``JobResult``.

    Example:
        >>> write_merge(store, setup, setup.plan, out_dir=None, keep_artifact=False,   # doctest: +SKIP
        ...             max_shard_size="5G", name="merged", desc="lora merge", options=RunOptions())
    """
    from ..runs import run_plan, run_plan_into_dir

    if out_dir and not keep_artifact:
        return run_plan_into_dir(store, plan, out_dir, parents=setup.parents, recipe=setup.recipe, files=setup.files,
                                 max_shard_size=max_shard_size, name=name, desc=desc, options=options)
    return run_plan(store, plan, kind="checkpoint", parents=setup.parents, recipe=setup.recipe, files=setup.files,
                    name=name, desc=desc, options=options)


def export_stored(store, result, out_dir: str | None, *, options: RunOptions, max_shard_size="5G"):
    """``result`` with ``output = out_dir`` once the checkpoint artifact it made is exported to
    ``out_dir`` as a Hugging Face directory; ``result`` itself when there is nothing to export (no
    ``out_dir``, a dry run, or a directory the merge already wrote).

    Example:
        >>> export_stored(store, run_plan(...), "merged", options=RunOptions())   # doctest: +SKIP
    """
    from ..runs import JobResult, export

    if not out_dir or result.artifact is None or result.output is not None:
        return result
    export(store, result.artifact.id, out_dir, max_shard_size=max_shard_size, max_memory=options.max_memory,
           progress=options.progress)
    return JobResult(result.estimate, result.artifact, out_dir, result.computed, result.skipped)
