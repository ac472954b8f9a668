"""The Python API: import, export, convert and combine checkpoints through the store and engine.

Every operation is the same three steps: resolve inputs to TensorSources, build a validated Plan,
stream it through the Executor into a sink (a store artifact or a Hugging Face directory) that
commits atomically. An interrupted run (Ctrl-C, kill) resumes when re-run with the same inputs.

How a job runs (device, memory budget, seed, compression, progress, dry run) is one
:class:`~tensorstore_llm.engine.options.RunOptions` passed as ``options=``; the same settings as
keywords (``max_memory="1G"``) still work and override it.
"""
from __future__ import annotations

import math
import os

from .dtypes import by_name
from .engine import plan_map
from .engine.options import RunOptions
from .errors import ArtifactNotFound, InvalidParameter
from .merge import soup
from .merge.card import with_chat_template
from .merge.recipe import load_recipe, prepare_merge, reference_key
from .merge.slices import with_depth
from .runs import (
    JobResult,
    check_float_target,
    export,
    open_store,
    resolve_input,
    run_plan,
    run_plan_into_dir,
    with_dtype,
)
from .store import Store

__all__ = ["JobResult", "RunOptions", "convert", "export", "greedy_soup", "import_checkpoint", "lora_merge", "merge",
           "open_store", "resolve_input", "run_plan", "weighted_sum"]


def import_checkpoint(src: str, store: Store, *, name: str | None = None, revision: str | None = None,
                      dtype: str | None = None, options: RunOptions | None = None, **run_options) -> JobResult:
    """Import a Hugging Face checkpoint directory, ``.safetensors`` file or hub repo as an artifact.

    Example:
        >>> import_checkpoint("models/base", open_store(), name="base")     # doctest: +SKIP
    """
    source, lineage, files = resolve_input(None, src, revision)
    with source:
        if dtype:
            check_float_target(source, dtype, f"import {src}")
        plan = plan_map("copy", {"src": source}, {"x": "src"}, dtype=dtype, where=src)
        return run_plan(store, plan, kind="checkpoint", source=lineage["external"],
                        recipe={"op": "import", "dtype": dtype}, files=with_dtype(files, dtype),
                        name=name, desc=f"import {os.path.basename(src.rstrip('/'))}", options=options, **run_options)


def convert(store: Store, ref: str, dtype: str, *, name: str | None = None, options: RunOptions | None = None,
            **run_options) -> JobResult:
    """A new artifact with the float tensors of ``ref`` cast to ``dtype`` (round to nearest even)."""
    source, lineage, files = resolve_input(store, ref)
    with source:
        check_float_target(source, dtype, f"convert {ref}")
        plan = plan_map("copy", {"src": source}, {"x": "src"}, dtype=dtype, where=ref)
        return run_plan(store, plan, kind="checkpoint", parents=[{**lineage, "role": "source"}],
                        recipe={"op": "convert", "dtype": by_name(dtype).name}, files=with_dtype(files, dtype),
                        name=name, desc=f"convert {ref}", options=options, **run_options)


def weighted_sum(store: Store, refs: list[str], weights: list[float], *, normalize: bool = False,
                 dtype: str | None = None, name: str | None = None, options: RunOptions | None = None,
                 **run_options) -> JobResult:
    """A new artifact ``sum_i w_i * model_i`` over every tensor (``/ sum_i w_i`` with ``normalize``).

    Example:
        >>> weighted_sum(store, ["ft1", "ft2"], [0.5, 0.5], name="soup")     # doctest: +SKIP
    """
    _check_weights(refs, weights)
    opened = []
    try:
        for r in refs:
            opened.append(resolve_input(store, r))
        sources = {f"model{i}": s for i, (s, _, _) in enumerate(opened)}
        if dtype is not None:
            check_float_target(opened[0][0], dtype, "weighted sum")
        plan = plan_map("weighted_sum", sources, {"models": list(sources)}, dtype=dtype,
                        params={"weights": weights, "normalize": normalize}, where="weighted sum")
        parents = [{**lineage, "role": "model", "ref": r} for r, (_, lineage, _) in zip(refs, opened)]
        return run_plan(store, plan, kind="checkpoint", parents=parents,
                        recipe={"op": "weighted_sum", "weights": list(weights), "normalize": normalize},
                        files=with_dtype(opened[0][2], dtype), name=name, desc="weighted sum", options=options,
                        **run_options)
    finally:
        for source, _, _ in opened:
            source.close()


def _check_weights(refs: list[str], weights: list[float]) -> None:
    """One finite number per model (InvalidParameter, exit 7, otherwise)."""
    if len(refs) != len(weights):
        raise InvalidParameter(f"weights: {len(refs)} models but {len(weights)} weights ({', '.join(map(str, refs))}); "
                               f"give one weight per model")
    for i, (ref, w) in enumerate(zip(refs, weights)):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise InvalidParameter(f"weights: weight {i + 1} (model {ref}) must be a finite number, got {w!r}")


def merge(store: Store, recipe: str, *, name: str | None = None, where: str = "recipe", arithmetic: str = "fp32",
          out_dir: str | None = None, max_shard_size="5G", keep_artifact: bool = False,
          options: RunOptions | None = None, **run_options) -> JobResult:
    """Run a mergekit-format YAML recipe (text) into a new checkpoint artifact, or with ``out_dir``
    straight into a Hugging Face directory.

    With ``out_dir`` the tensors are written once, into the directory (shards of
    ``max_shard_size``, the recipe as ``mergekit_config.yml``, a model card as ``README.md``);
    the store gets an ``export`` artifact holding no tensors, only the lineage (inputs, recipe,
    run) and the directory's path and tensor checksums (``JobResult.artifact``; tagged ``name``).
    ``keep_artifact=True`` stores the checkpoint artifact too and exports it (a second copy).

    Everything that can fail (references, tensors, shapes, parameters) is checked before any
    tensor is computed. The artifact's lineage records every input and the recipe.
    ``arithmetic="mergekit"`` replays mergekit's operations in the recipe's dtype (bit-exact
    comparison mode, linear, task-arithmetic methods and model_stock); the default computes in fp32.
    The method (``merge/methods/``) prepares what it needs first (Mediator's conflict table,
    Sens-Merging's scores), streamed under the same options; ``JobResult.analysis`` holds what
    it reports (Mediator's table).

    Example:
        >>> merge(store, open("ties.yaml").read(), name="merged", max_memory="4G")   # doctest: +SKIP
    """
    opts = RunOptions.of(options, **run_options)
    parsed = load_recipe(recipe, where)
    refs = list(dict.fromkeys(([parsed.base] if parsed.base else []) + [m.ref for m in parsed.models]))
    opened = {}
    try:
        for ref in refs:
            try:
                opened[ref] = resolve_input(store, ref)
            except ArtifactNotFound as e:   # name the recipe and its key (models[1].model)
                raise type(e)(f"{where}: {reference_key(parsed, ref)}: {e}") from None
        sources = {ref: o[0] for ref, o in opened.items()}
        files = with_chat_template(with_dtype(opened[parsed.base or refs[0]][2], parsed.out_dtype), parsed.chat_template,
                                   [opened[ref][2] for ref in refs], where)   # checked before any work
        files = with_depth(files, parsed, where)   # slices: config.json for the output's layer count
        from .merge.vocab import merged_vocabulary   # tokenizer_source / tokenizer: (merge/tokenizer.py)
        sources, files = merged_vocabulary(parsed, sources, {ref: o[2] for ref, o in opened.items()}, files, where, opts)
        plan, prepared = prepare_merge(parsed, sources, {ref: o[2] for ref, o in opened.items()}, where, opts, arithmetic)
        parents = [{**opened[ref][1], "role": "base" if ref == parsed.base else "model", "ref": ref} for ref in refs]
        recipe_record = {"op": "merge", "merge_method": parsed.method, "recipe": parsed.raw}
        if arithmetic != "fp32":
            recipe_record["arithmetic"] = arithmetic
        recipe_record.update(prepared.record)
        if out_dir and not keep_artifact and not opts.dry_run:
            result = run_plan_into_dir(store, plan, out_dir, parents=parents, recipe=recipe_record, files=files,
                                       max_shard_size=max_shard_size, name=name, desc=f"merge {parsed.method}",
                                       options=opts)
        else:
            result = run_plan(store, plan, kind="checkpoint", parents=parents, recipe=recipe_record,
                              files=files, name=name, desc=f"merge {parsed.method}", options=opts)
            if out_dir and not opts.dry_run:
                exported = export(store, result.artifact.id, out_dir, max_shard_size=max_shard_size,
                                  max_memory=opts.max_memory, progress=opts.progress)
                result.output = exported.output
        result.analysis = prepared.analysis
        return result
    finally:
        for source, _, _ in opened.values():
            source.close()


def greedy_soup(store: Store, refs: list[str], score, *, name: str | None = None, options: RunOptions | None = None,
                **run_options):
    """Greedy model soup (``merge/soup.py``) of ``refs`` (store refs, HF directories or hub ids):
    candidates are uniform weighted sums in the store, scored on their export.

    Args:
        score: a callable scoring an exported HF directory (higher is better), e.g.
            ``merge.soup.command_score("python eval.py {path}")``.
        name: tag for the final soup.
    Returns:
        SoupResult: the soup artifact, the kept refs in the order added, every candidate's score.
    Example:
        >>> greedy_soup(store, ["ft1", "ft2", "ft3"], command_score("python eval.py {path}"), name="soup")  # doctest: +SKIP
    """
    opts = RunOptions.of(options, **run_options)
    steps = soup.SoupSteps(
        average=lambda members: weighted_sum(store, members, [1.0] * len(members), normalize=True, options=opts).artifact,
        export=lambda artifact, out: export(store, artifact.id, out, max_memory=opts.max_memory, progress=opts.progress))
    result = soup.greedy_soup(list(refs), score, steps)
    if name:
        store.tag(result.artifact.id, name)
    return result


def lora_merge(store: Store, base: str, adapter: str, *, scale: float = 1.0, name: str | None = None,
               out_dir: str | None = None, max_shard_size="5G", keep_artifact: bool = False, transfer: bool = False,
               options: RunOptions | None = None, **run_options) -> JobResult:
    """Merge a PEFT LoRA / DoRA adapter into ``base``, streamed, as a new checkpoint artifact, or
    with ``out_dir`` straight into a Hugging Face directory (``lora.jobs.lora_merge``).

    Every targeted weight becomes W + s·B·A (s = alpha/r, or alpha/√r for rsLoRA, times
    ``scale``; DoRA: m·(W + s·B·A)/‖W + s·B·A‖), computed in fp32 and rounded once to the base's
    dtype, which is PEFT's ``merge_and_unload()`` result; W is read by row blocks within
    ``max_memory`` and each module's factors are read whole. ``modules_to_save`` tensors replace
    the base's; the rest is copied. With ``out_dir`` the tensors are written once, into the
    directory (with a model card), and the store keeps a tensorless ``export`` record of the
    lineage; ``keep_artifact=True`` stores the checkpoint too and exports it.

    Args:
        base: store ref, HF directory or hub repo.
        adapter: a ``lora`` artifact or a PEFT adapter directory (``adapter_config.json`` +
            ``adapter_model.safetensors``; a pickled ``adapter_model.bin`` is refused). An
            artifact bound to another base is refused unless ``transfer``.
    Returns:
        JobResult of the merge (``artifact``: the merged checkpoint, or with ``out_dir`` the
        export record; ``output``: the directory).
    Example:
        >>> lora_merge(store, "base", "./my-adapter", name="merged", max_memory="1G")   # doctest: +SKIP
    """
    from .lora.jobs import lora_merge as merge_streamed

    return merge_streamed(store, base, adapter, scale=scale, transfer=transfer, name=name, out_dir=out_dir,
                          max_shard_size=max_shard_size, keep_artifact=keep_artifact, options=options, **run_options)
