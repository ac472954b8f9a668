"""QLoRA merge, streamed: merge an adapter into dequant(NF4(W)), the weights it was trained against.

``tsllm lora merge BASE ADAPTER --base-quant nf4`` runs the plain merge's plan
(:func:`.plans.plan_lora_merge`: every base tensor, merged where the adapter targets it) with the
targeted weights' jobs swapped for the NF4 ops of :mod:`tensorstore_llm.ops.nf4_merge`: one
statistics pass over W for its per-block absmaxes, then row blocks of dequant(NF4(W)) + s·B·A,
within ``--max-memory`` like any streamed job. The result equals the in-memory path
(:func:`.api.merge_adapter` with ``base_quant="nf4"``) bit for bit.

The report (‖q‖/‖Δ‖ per module, q = W − dequant(NF4(W)), and with ``requantize`` the error of
requantising the merged weight) comes from a reduction run over the same tensors before the merge.
Bases that are already quantised (bitsandbytes NF4 checkpoints, GPTQ / AWQ packed weights) are
dequantised by the in-memory path instead, one shard at a time. ``requantize="nf4-packed"`` writes
a bitsandbytes 4-bit checkpoint (:mod:`.nf4_packed`): the same merge, then every Linear weight
packed by rows, through a sink that stores bitsandbytes' shapes and state tensors.
"""
from __future__ import annotations

import dataclasses
import math

from ..engine.options import RunOptions
from ..engine.plan import Plan, TensorJob
from ..errors import RecipeError
from ..io.base import TensorMeta, TensorSource
from ..ops.nf4_merge import Nf4MergeParams
from .peft_format import LoraAdapter

_SWAP = {"lora_merge": ("nf4_lora_merge", "nf4_merge_error"), "dora_merge": ("nf4_dora_merge", "nf4_dora_merge_error"),
         "dora_merge_transposed": ("nf4_dora_merge_transposed", "nf4_dora_transposed_error")}
QUANTIZED_SUFFIXES = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4", ".qweight")


def is_quantized(source: TensorSource) -> bool:
    """Whether ``source`` holds bitsandbytes / GPTQ / AWQ quantised weights (not streamed here)."""
    return any(k.endswith(QUANTIZED_SUFFIXES) for k in source.keys())  # a TensorSource is not iterable


def nf4_plans(plan: Plan, adapter: LoraAdapter, *, requantize: bool = False) -> tuple[Plan, Plan]:
    """(merge plan, report plan) from the plain merge's ``plan``: each targeted weight's job becomes
    its QLoRA op, and the report plan holds one reduction per targeted weight.

    Args:
        plan: :func:`.plans.plan_lora_merge` of the same base and adapter.
        requantize: write dequant(NF4(W')) instead of W' and report its error.
    Returns:
        two validated plans over the same sources.
    """
    jobs, reports = [], []
    for job in plan.jobs:
        swap = _SWAP.get(job.op)
        if swap is None:
            jobs.append(job)
            continue
        w_ref = dict(job.inputs)["w"]
        params = Nf4MergeParams(scaling=job.params.scaling, transpose=job.params.transpose,
                                base_dtype=plan.input_meta(w_ref).dtype, out_dtype=job.output.dtype,
                                dora=job.op != "lora_merge", requantize=requantize)
        jobs.append(dataclasses.replace(job, op=swap[0], params=params))
        inputs = job.inputs if params.dora else tuple((r, ref) for r, ref in job.inputs if r != "magnitude")
        record = TensorMeta(job.output.name, job.output.shape, job.output.dtype)
        reports.append(TensorJob(record, swap[1], inputs, params, reduce_only=True))
    merge_plan, report_plan = Plan(jobs, plan.sources), Plan(reports, plan.sources)
    merge_plan.validate("lora merge --base-quant nf4")
    report_plan.validate("lora merge --base-quant nf4")
    return merge_plan, report_plan


def nf4_report(report_plan: Plan, adapter: LoraAdapter, *, scale: float = 1.0, options=None, **run_options) -> dict:
    """Run the report plan; module -> ``rank``, ``scaling``, ``q_over_delta`` (and
    ``requant_error``), as :func:`.api.merge_adapter` reports them."""
    from ..engine import Executor

    executor = Executor(report_plan, None, options, desc="nf4 report", **run_options)
    executor.run()
    by_weight = {m.weight_name: m for m in adapter.modules.values()}
    out = {}
    for job in report_plan.jobs:
        rec, m = executor.records[job.output.name], by_weight[job.output.name]
        delta = math.sqrt(rec["delta_sq"])
        info = {"rank": m.r, "scaling": m.scaling * scale,
                "q_over_delta": math.sqrt(rec["q_sq"]) / delta if delta > 0 else math.inf}
        if "requant_sq" in rec:
            info["requant_error"] = math.sqrt(rec["requant_sq"]) / delta if delta > 0 else math.inf
        out[m.module] = info
    return out


def qlora_merge(store, base: str, adapter: str, *, scale: float = 1.0, requantize: bool | str | None = None,
                transfer: bool = False, name: str | None = None, out_dir: str | None = None,
                max_shard_size="5G", keep_artifact: bool = False, options: RunOptions | None = None, **run_options):
    """Merge a QLoRA adapter into dequant(NF4(``base``)), streamed into a checkpoint artifact.

    Same references, binding checks and ``out_dir`` / ``keep_artifact`` as :func:`.jobs.lora_merge`
    (with ``out_dir`` the dense result is written once, into the directory; the packed one is
    stored, then exported). ``requantize``:
    ``"nf4"`` (or True) writes dequant(NF4(W')) for every merged weight, dense; ``"nf4-packed"``
    writes a bitsandbytes 4-bit checkpoint (every Linear weight packed, config.json with
    ``quantization_config``; :mod:`.nf4_packed`), which transformers loads with ``load_in_4bit``.
    ``options`` / ``run_options``: how to run (:class:`RunOptions`, or its fields as keywords).
    Returns the ``JobResult`` with ``analysis = {"transfer": ..., "modules": per-module report}``
    (``q_over_delta``: ‖q‖/‖Δ‖; with requantize ``requant_error``: ‖W' − dequant(NF4(W'))‖/‖Δ‖).

    Raises:
        RecipeError for a base that is already quantised (use :func:`.api.merge_adapter`, which
        dequantises it), a prefix-tuning adapter or an unknown ``requantize``; BaseMismatch for an
        adapter bound to another base without ``transfer``; ShapeMismatch (packed) for a Linear
        weight whose in_features is not a multiple of 64. Nothing is written then.
    Example: ``qlora_merge(store, "base", "./qlora-adapter", name="merged")``.
    """
    from .merge_setup import export_stored, merge_setup, write_merge
    from .nf4_packed import PACKED

    opts = RunOptions.of(options, **run_options)
    requantize = {True: "nf4", False: None}.get(requantize, requantize) if isinstance(requantize, bool) else requantize
    if requantize not in (None, "nf4", PACKED):
        raise RecipeError(f"requantize must be None, 'nf4' or {PACKED!r}, got {requantize!r}")
    where = f"lora merge {adapter} --base-quant nf4"

    def refuse_quantized(source):
        if is_quantized(source):
            raise RecipeError(f"{where}: {base} is already quantised (bitsandbytes / GPTQ / AWQ weights); "
                              "merge it into -o DIR with the in-memory path, which dequantises it")
    with merge_setup(store, base, adapter, scale=scale, transfer=transfer, where=where, check_source=refuse_quantized,
                     recipe_fields={"base_quant": "nf4", "requantize": requantize}) as setup:
        transferred = setup.transferred
        plan, report_plan = nf4_plans(setup.plan, setup.lora, requantize=requantize == "nf4")
        if requantize == PACKED:
            result, report = _run_packed(store, setup, plan, scale=scale, where=where, name=name, options=opts)
        else:
            report = {} if opts.dry_run else nf4_report(report_plan, setup.lora, scale=scale, options=opts)
            setup.release_adapter()     # the plan reads the factors through opened.source
            result = write_merge(store, setup, plan, out_dir=out_dir, keep_artifact=keep_artifact,
                                 max_shard_size=max_shard_size, name=name, desc="lora merge (nf4)", options=opts)
    result = export_stored(store, result, out_dir, options=opts, max_shard_size=max_shard_size)
    result.analysis = {"transfer": transferred, "modules": report}
    return result


def _run_packed(store, setup, swapped: Plan, *, scale, where, name, options: RunOptions):
    """The packed merge of ``setup`` (a :class:`.merge_setup.MergeSetup`; ``swapped``: its plan
    through :func:`nf4_plans`): its reductions (report and state records), then the plan into a
    :class:`.nf4_packed.BnbPackedSink` over the store's writer (as ``runs.run_plan`` streams)."""
    from ..engine import Executor, resolve_device
    from ..runs import JobResult, run_record, stream_into
    from ..store import job_key
    from .nf4_packed import (
        BnbPackedSink,
        dense_dtype,
        packed_plans,
        quantized_config,
        run_report,
    )

    parents, recipe, opts = setup.parents, setup.recipe, options
    plan, report_plan, packed = packed_plans(setup.plan, swapped, where=where + " --requantize nf4-packed")
    files = quantized_config(setup.files or {}, dense_dtype(packed), where)
    executor = Executor(plan, None, opts, desc="lora merge (nf4, packed)")
    if opts.dry_run:
        return JobResult(executor.estimate()), {}
    report, records = run_report(report_plan, setup.lora, scale=scale, options=opts)
    dev = resolve_device(opts.device)
    key = job_key("checkpoint", plan.fingerprint(), opts.seed, dev.type, opts.compression, list(parents), None, recipe)
    writer = store.create(key, opts.compression)
    sink = BnbPackedSink(writer, packed, records)
    executor.sink = sink
    estimate = executor.estimate()
    stream_into(executor, sink)
    artifact = writer.commit(kind="checkpoint", parents=parents, recipe=recipe, files=files,
                             run=run_record(opts, dev.type, compression=opts.compression))
    if name:
        store.tag(artifact.id, name)
    return JobResult(estimate, artifact, None, executor.computed, executor.skipped), report
