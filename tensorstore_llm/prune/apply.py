"""The pruned checkpoint: an engine plan of gathers (structured) or masks, and its config.json.

Structured: q / k / v / gate / up weights (and q / k / v biases) keep the rows of the kept heads /
channels (op ``gather_rows``, the weight read whole once, stored values copied unchanged); o / down
keep the matching columns (op ``gather_columns``, streamed by row blocks); everything else is
copied. Masks (unstructured, n:m) zero entries of the same linear weights (ops ``prune_mask`` /
``prune_mask_wanda``), streamed by rows, shapes unchanged.

The config gets the new ``intermediate_size``, ``num_key_value_heads`` and
``num_attention_heads`` and an explicit ``head_dim`` (hidden / heads no longer gives it).
Transformers (checked: 5.x) reads one ``intermediate_size`` and one ``num_key_value_heads`` for
all layers in every family this tool knows (Llama, Mistral, Qwen2/3, Gemma 1-3); the only
architecture with per-layer MLP sizes is Gemma 3n (``intermediate_size`` as a list), whose layout
(AltUp, LAuReL) this tool does not handle. So a plan whose layers differ in size is refused when
the pruned model is to be loaded by transformers (NonUniformLayers), with the per-layer sizes in
the message; the plan itself, its recovery and the merge into the full model work regardless.
"""
from __future__ import annotations

import json

from ..engine.plan import ROWS, WHOLE, InputRef, Plan, TensorJob
from ..errors import RecipeError
from ..io.base import TensorMeta
from ..ops.prune import GatherParams, MaskParams
from .plan import PRUNED_ROLES, PruningPlan

MASKED_ROLES = PRUNED_ROLES


class NonUniformLayers(RecipeError):
    """A pruned model whose layers differ in size cannot be written as a transformers config."""


def pruned_config(config: dict, plan: PruningPlan) -> dict:
    """``config`` (config.json as a dict) of the pruned model; NonUniformLayers when layers differ."""
    if plan.structure != "structured":
        return dict(config)
    sizes = plan.layer_sizes()
    if not plan.uniform:
        distinct = sorted({(s["intermediate_size"], s["num_key_value_heads"]) for s in sizes})
        raise NonUniformLayers(
            f"the plan gives layers different sizes ({len(distinct)} distinct (intermediate_size, kv heads) pairs, "
            f"e.g. {distinct[:3]}); transformers reads one intermediate_size and one num_key_value_heads for every "
            f"layer of {plan.arch.family} models (only Gemma 3n takes a per-layer intermediate_size list, and this "
            "tool does not handle its layout). Use a uniform ratio to export, or recover and merge into the full model")
    out = dict(config)
    target = out["text_config"] if isinstance(out.get("text_config"), dict) else out
    target.update(sizes[0])
    target["head_dim"] = plan.arch.head_dim
    return out


def pruned_config_bytes(config_bytes: bytes, plan: PruningPlan) -> bytes:
    """config.json bytes of the pruned model (pretty-printed, sorted keys)."""
    return json.dumps(pruned_config(json.loads(config_bytes), plan), indent=2, sort_keys=True).encode() + b"\n"


def plan_pruned_checkpoint(source, plan: PruningPlan, norms_source=None, where: str = "prune") -> Plan:
    """An engine plan writing the pruned model from ``source`` (the plan's base)."""
    arch = plan.arch
    jobs = []
    sources = {"base": source}
    if norms_source is not None:
        sources["norms"] = norms_source
    for name in source.keys():
        meta = source.meta(name)
        role = arch.role(name)
        prunable = role.role in PRUNED_ROLES and role.layer is not None
        if plan.structure == "structured" and prunable and role.axis is not None:
            index = plan.rows(role.role, role.layer)
            if len(index) == meta.shape[role.axis]:
                jobs.append(TensorJob(meta, "copy", (("x", InputRef("base", name)),)))
                continue
            shape = list(meta.shape)
            shape[role.axis] = len(index)
            out = TensorMeta(name, tuple(shape), meta.dtype)
            if role.axis == 0:
                jobs.append(TensorJob(out, "gather_rows", (("x", InputRef("base", name, WHOLE)),),
                                      GatherParams(tuple(index))))
            else:
                jobs.append(TensorJob(out, "gather_columns", (("x", InputRef("base", name, ROWS)),),
                                      GatherParams(tuple(index))))
        elif plan.structure != "structured" and prunable and role.kind == "weight":
            params = MaskParams(pattern="unstructured" if plan.structure == "unstructured" else "n:m",
                                sparsity=float(plan.mask.get("sparsity", 0.0)), n=int(plan.mask.get("n", 2)),
                                m=int(plan.mask.get("m", 4)))
            if params.pattern == "n:m" and meta.shape[1] % params.m:
                raise RecipeError(f"{where}: tensor {name!r} has {meta.shape[1]} columns, not a multiple of {params.m}")
            if plan.mask.get("score") == "wanda":
                module = name[: -len(".weight")]
                inputs = (("x", InputRef("base", name)), ("norm", InputRef("norms", f"norms.{module}", WHOLE)))
                jobs.append(TensorJob(meta, "prune_mask_wanda", inputs, params))
            else:
                jobs.append(TensorJob(meta, "prune_mask", (("x", InputRef("base", name)),), params))
        else:
            jobs.append(TensorJob(meta, "copy", (("x", InputRef("base", name)),)))
    result = Plan(jobs, sources)
    result.validate(where)
    return result
