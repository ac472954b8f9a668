"""What every streamed LoRA merge sets up before it runs: the adapter and the base opened, the
adapter's binding checked (or the transfer recorded), the plain merge plan, the lineage and the
recipe record. Shared by :func:`.jobs.lora_merge` and :func:`.qlora.qlora_merge`, which differ
only in what they do with the plan.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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

    opened: object          # jobs.OpenedAdapter: the adapter's factors are read through opened.source
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
    from .jobs import _lora_only, open_adapter_ref
    from .plans import plan_lora_merge

    refuse_non_adapter(store, adapter, where)
    opened = open_adapter_ref(store, adapter)
    lora = _lora_only(opened, "lora merge")
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
