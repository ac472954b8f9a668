"""``lora merge --base-quant nf4 --requantize nf4-packed``: a QLoRA merge written as a bitsandbytes
4-bit checkpoint, streamed.

transformers' bitsandbytes quantiser converts every ``nn.Linear`` but ``lm_head`` to NF4 and saves
each as ``<w>`` (packed uint8, (bytes, 1)), ``<w>.absmax`` (8-bit codes), ``<w>.quant_map``,
``<w>.nested_absmax``, ``<w>.nested_quant_map`` and ``<w>.quant_state.bitsandbytes__nf4`` (JSON),
with ``quantization_config`` in config.json (:func:`.nf4.to_bnb_state_dict`,
:func:`.nf4.bnb_quantization_config`). Here every such weight becomes a row-split job of
:mod:`tensorstore_llm.ops.nf4_pack` (a merged one: dequant(NF4(W)) + s·B·A, then NF4 of that;
one the adapter leaves alone: NF4 of W), within ``--max-memory``. The jobs write (rows, in / 2)
codes and (rows, in / 64) absmax codes; :class:`BnbPackedSink` stores them in bitsandbytes' shapes
and adds the small tensors of each state, which a reduction run computes first (with the
report: ‖q‖/‖Δ‖ and the requantisation error ‖W' − dequant(NF4(W'))‖/‖Δ‖ per module).

Which weights are Linear is read from the names: 2-D ``*.weight`` tensors except embeddings
(a module named ``*embed*``, ``wte``, ``wpe``) and ``lm_head`` / ``embed_out``. Weights the
adapter targets that are not Linear (embedding LoRA) stay dense: dequant(NF4(W)) + s·B·A.
"""
from __future__ import annotations

import json
import math

import torch

from ..engine.plan import Plan, TensorJob
from ..errors import RecipeError, ShapeMismatch
from ..io.base import TensorMeta
from ..ops.nf4_merge import Nf4MergeParams
from ..ops.nf4_pack import Nf4PackParams
from . import nf4 as N

PACKED = "nf4-packed"
_DENSE_LEAVES = ("lm_head", "embed_out", "wte", "wpe")
_MERGE_OPS = {"lora_merge": ("nf4_pack_merge", "nf4_pack_merge_error"),
              "dora_merge": ("nf4_pack_dora_merge", "nf4_pack_dora_merge_error")}


def is_linear_weight(meta: TensorMeta) -> bool:
    """Whether transformers' bitsandbytes quantiser would store ``meta`` in 4 bits (see module note)."""
    if not meta.name.endswith(".weight") or len(meta.shape) != 2:
        return False
    leaf = meta.name[: -len(".weight")].rsplit(".", 1)[-1]
    return leaf not in _DENSE_LEAVES and "embed" not in leaf


def _packed_metas(meta: TensorMeta) -> tuple[TensorMeta, TensorMeta]:
    rows, n_in = meta.shape
    return (TensorMeta(meta.name, (rows, n_in // 2), "uint8"),
            TensorMeta(meta.name + ".absmax", (rows, n_in // 64), "uint8"))


def packed_plans(plan: Plan, nf4_swapped: Plan, *, where: str) -> tuple[Plan, Plan, dict[str, TensorMeta]]:
    """(merge plan, report plan, packed weight name -> its dense meta) for a packed QLoRA merge.

    Args:
        plan: :func:`.plans.plan_lora_merge` of the base and adapter.
        nf4_swapped: :func:`.qlora.nf4_plans`' merge plan of the same (used for targeted weights
            that stay dense).
    Raises:
        ShapeMismatch naming the weight when its in_features is not a multiple of 64;
        RecipeError for a targeted Linear weight in a transposed (Conv1D) layout.
    """
    dense = {j.output.name: j for j in nf4_swapped.jobs}
    jobs, reports, packed = [], [], {}
    for job in plan.jobs:
        meta = job.output
        if not is_linear_weight(meta):
            jobs.append(dense[meta.name])
            continue
        if meta.shape[1] % 64:
            raise ShapeMismatch(f"{where}: {meta.name} {list(meta.shape)}: packed NF4 is written row by row, which "
                                f"needs in_features to be a multiple of bitsandbytes' 64-element block; use "
                                f"--requantize nf4 (dense) for this model")
        out, absmax = _packed_metas(meta)
        inputs = job.inputs
        if job.op in _MERGE_OPS and not job.params.transpose:
            w_ref = dict(job.inputs)["w"]
            params = Nf4MergeParams(scaling=job.params.scaling, base_dtype=plan.input_meta(w_ref).dtype,
                                    out_dtype=meta.dtype, dora=job.op != "lora_merge", requantize=True)
            op, report_op = _MERGE_OPS[job.op]
        elif job.op == "copy":
            params = Nf4PackParams(out_dtype=meta.dtype)
            op, report_op = "nf4_pack", "nf4_pack_state"
            inputs = (("w", dict(job.inputs)["x"]),)
        else:
            raise RecipeError(f"{where}: {meta.name} ({job.op}) cannot be written as packed NF4 (a transposed / "
                              "Conv1D layout); use --requantize nf4 (dense)")
        jobs.append(TensorJob(out, op, inputs, params, extra_outputs=(absmax,)))
        reports.append(TensorJob(out, report_op, inputs, params, reduce_only=True))
        packed[meta.name] = meta
    merge_plan, report_plan = Plan(jobs, plan.sources), Plan(reports, plan.sources)
    merge_plan.validate(where)
    report_plan.validate(where)
    return merge_plan, report_plan, packed


def run_report(report_plan: Plan, adapter, *, scale: float = 1.0, options=None, **run_options):
    """Run the reductions: (module -> ``rank``, ``scaling``, ``q_over_delta``, ``requant_error``;
    weight name -> its state record ``offset``, ``nested_absmax``)."""
    from ..engine import Executor

    executor = Executor(report_plan, None, options, desc="nf4 packed report", **run_options)
    executor.run()
    by_weight = {m.weight_name: m for m in adapter.modules.values()}
    modules = {}
    for job in report_plan.jobs:
        rec, m = executor.records[job.output.name], by_weight.get(job.output.name)
        if m is None:
            continue
        delta = math.sqrt(rec["delta_sq"])
        modules[m.module] = {"rank": m.r, "scaling": m.scaling * scale, "packed": True,
                             "q_over_delta": math.sqrt(rec["q_sq"]) / delta if delta > 0 else math.inf,
                             "requant_error": math.sqrt(rec["requant_sq"]) / delta if delta > 0 else math.inf}
    return modules, {name: executor.records[name] for name in (j.output.name for j in report_plan.jobs)}


def state_tensors(meta: TensorMeta, record: dict) -> dict[str, torch.Tensor]:
    """The small tensors of a packed weight's bitsandbytes state (quant maps, nested absmax, JSON)."""
    dtype = getattr(torch, meta.dtype)
    return {meta.name + ".quant_map": N.NF4_CODE.clone(),
            meta.name + ".nested_absmax": torch.tensor(record["nested_absmax"], dtype=torch.float32),
            meta.name + ".nested_quant_map": N.dynamic_map(signed=True).clone(),
            meta.name + ".quant_state.bitsandbytes__nf4": N.quant_state_bytes(meta.shape, dtype, record["offset"])}


class BnbPackedSink:
    """A sink that stores the packed jobs' outputs in bitsandbytes' shapes ((rows, in / 2) codes as
    (rows * in / 2, 1), (rows, in / 64) absmax codes as (rows * in / 64,)) and writes each packed
    weight's small state tensors first; everything else passes through to ``inner``."""

    def __init__(self, inner, packed: dict[str, TensorMeta], records: dict[str, dict]):
        self.inner, self.packed = inner, packed
        self.small = {k: v for name, meta in packed.items() for k, v in state_tensors(meta, records[name]).items()}
        self.reshaped = {}
        for name, meta in packed.items():
            rows, n_in = meta.shape
            self.reshaped[name] = (TensorMeta(name, (rows * n_in // 2, 1), "uint8"), n_in // 2)
            self.reshaped[name + ".absmax"] = (TensorMeta(name + ".absmax", (rows * n_in // 64,), "uint8"), n_in // 64)

    def __getattr__(self, attr):          # commit, close, abort, staging details: the inner sink's
        return getattr(self.inner, attr)

    def prepare(self, metas) -> None:
        """Declare the tensors in their stored shapes plus the state tensors; write the latter."""
        metas = [self.reshaped[m.name][0] if m.name in self.reshaped else m for m in metas]
        small = [TensorMeta(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in self.small.items()]
        self.inner.prepare(metas + small)
        done = self.inner.completed()
        for name, value in self.small.items():
            if name not in done:
                self.inner.write_rows(name, 0, value)
                self.inner.finish(name)

    def preferred_rows(self, meta: TensorMeta) -> int:
        if meta.name not in self.reshaped:
            return self.inner.preferred_rows(meta)
        stored, per_row = self.reshaped[meta.name]
        return max(1, self.inner.preferred_rows(stored) // per_row)

    def completed(self) -> dict[str, str]:
        return self.inner.completed()

    def write_rows(self, name: str, start: int, block) -> None:
        if name not in self.reshaped:
            return self.inner.write_rows(name, start, block)
        stored, per_row = self.reshaped[name]
        self.inner.write_rows(name, start * per_row, block.reshape(-1, *stored.shape[1:]))

    def finish(self, name: str) -> str:
        return self.inner.finish(name)


def quantized_config(files: dict, dtype: str, where: str) -> dict:
    """``files`` with config.json carrying bitsandbytes' ``quantization_config`` (compute dtype:
    the base's); RecipeError when the base has no config.json (transformers could not load it)."""
    path = files.get("config.json")
    if path is None:
        raise RecipeError(f"{where}: the base has no config.json, so a packed NF4 checkpoint could not say how "
                          "it is quantised; use --requantize nf4 (dense)")
    if isinstance(path, bytes):
        config = json.loads(path)
    else:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    config["quantization_config"] = N.bnb_quantization_config(dtype)
    return {**files, "config.json": json.dumps(config, indent=2, sort_keys=True).encode()}


def dense_dtype(packed: dict[str, TensorMeta]) -> str:
    """The dtype the packed weights had (bitsandbytes' compute dtype in the config)."""
    dtypes = {m.dtype for m in packed.values()}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


__all__ = ["PACKED", "BnbPackedSink", "is_linear_weight", "packed_plans", "quantized_config", "run_report",
           "state_tensors"]
