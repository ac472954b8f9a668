"""``twin``: Twin-Merging (Lu et al. 2024, "Twin-Merging: Dynamic Integration of Modular
Expertise in Model Merging", NeurIPS 2024), without its router.

The shared knowledge is merged into one model, θs = θ0 + λ Σ wi τi (default wi = 1 / number of
models: the models' mean), which is the merge's output. Each task's exclusive knowledge θi − θs
is compressed by a rank-``rank`` SVD per linear weight (embeddings and the LM head are left out)
and exported as a PEFT LoRA adapter in ``experts_dir`` (``expert-<k>-<model>``), so
``θs + adapter_k`` approximates model k. The paper's router, which mixes the experts per input
at inference time, is out of scope: load one adapter (or combine them with ``tsllm lora``) as
the task requires. Kernels: ``ops/seed_merges.py`` (``protected_task_arithmetic`` without a
statistic for θs, ``twin_expert`` for the adapters).
"""
from __future__ import annotations

import os
import re

from ...dtypes import by_name
from ...engine.plan import WHOLE, InputRef, Plan, TensorJob
from ...errors import OutputExists, RecipeError
from ...io.base import TensorMeta
from ...ops import seed_merges  # noqa: F401  (registers the ops)
from ...ops.seed_merges import TwinExpertParams, expert_factor_names
from .base import LAMBDA, WEIGHT, Domain, JobSpec, MergeMethod, Param, Prepared, integer, model_inputs, others_of

DIRECTORY = Domain("the path of a directory", lambda v: isinstance(v, str) and v != "")


class TwinMerging(MergeMethod):
    """base_model and at least one other model; ``experts_dir`` (required: where the expert
    adapters go, each must not exist yet), ``rank`` (default 16), ``weight`` per model and
    ``lambda`` for the shared model."""

    name = "twin"
    parameters = {"weight": WEIGHT, "lambda": LAMBDA, "rank": Param(integer(1), per_tensor=False),
                  "experts_dir": Param(DIRECTORY, per_tensor=False)}

    def check_parameters(self, recipe, where):
        path = recipe.parameters.get("experts_dir")
        if path is None:
            raise RecipeError(f"{where}: twin needs parameters.experts_dir, the directory its expert adapters "
                              f"(one PEFT LoRA per model) are written to")
        for target in expert_dirs(recipe).values():
            if os.path.exists(target):
                raise OutputExists(f"{where}: expert adapter directory {target} already exists")

    def job(self, recipe, tensor, state):
        value, others = tensor.value, tensor.others
        return JobSpec("protected_task_arithmetic", (("base", InputRef(tensor.base, tensor.name)),
                                                     ("models", model_inputs([m.ref for m in others], tensor.name))),
                       shared_params(recipe, tensor.name, value, others))

    def prepare(self, recipe, inputs, options):
        plan = inputs.validate(None)   # the shared model's plan: every tensor checked before any work
        if options.dry_run:
            return Prepared()
        adapters = expert_adapters(recipe, plan, inputs, options)
        return Prepared(None, {"experts": adapters})


def shared_params(recipe, name: str, value, others) -> dict:
    """The shared merge's op parameters for tensor ``name``."""
    return {"weights": [value("weight", m, 1.0 / len(others)) for m in others], "lam": value("lambda", default=1.0)}


def expert_dirs(recipe) -> dict:
    """{model ref: the directory its expert adapter is written to}."""
    root = str(recipe.parameters["experts_dir"])
    out = {}
    for k, m in enumerate(others_of(recipe)):
        label = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.normpath(m.ref))) or "model"
        out[m.ref] = os.path.join(root, f"expert-{k}-{label}")
    return out


def expert_adapters(recipe, shared_plan: Plan, inputs, options) -> dict:
    """Run the ``twin_expert`` jobs (one per model and linear weight, whole tensors, streamed
    one module at a time) and write one PEFT adapter per model; returns {ref: report}."""
    from ...engine import resolve_device
    from ...engine.executor import Executor
    from ...lora.peft_format import build_adapter, write_adapter
    from ...lora.streamed import MemorySink, is_embedding

    others = others_of(recipe)
    rank = recipe.parameters.get("rank", 16)
    jobs = []
    for job in shared_plan.jobs:
        name = job.output.name
        if not name.endswith(".weight") or len(job.output.shape) != 2 or is_embedding(name) or "lm_head" in name:
            continue
        module, r = name[: -len(".weight")], min(int(rank), *job.output.shape)
        for k in range(len(others)):
            params = TwinExpertParams(weights=job.params.weights, lam=job.params.lam, index=k, rank=r, module=module,
                                      shared_dtype=job.output.dtype if by_name(job.output.dtype).is_float else "float32")
            a, b, rec = expert_factor_names(module, k)
            out, cols = job.output.shape
            jobs.append(TensorJob(TensorMeta(a, (r, cols), "float32"), "twin_expert",
                                  (("base", InputRef(recipe.base, name, WHOLE)),
                                   ("models", tuple(InputRef(m.ref, name, WHOLE) for m in others))), params,
                                  extra_outputs=(TensorMeta(b, (out, r), "float32"), TensorMeta(rec, (2,), "float32"))))
    if not jobs:
        raise RecipeError(f"{inputs.where}: twin found no linear weight to put an expert adapter on")
    plan = Plan(jobs, dict(inputs.sources))
    plan.validate(inputs.where)
    sink = MemorySink()
    Executor(plan, sink, options, desc="twin experts").run()
    reports = {}
    for k, (m, target) in enumerate(expert_dirs(recipe).items()):
        factors, energy, kept = {}, 0.0, 0.0
        for job in jobs:
            if job.params.index != k:
                continue
            a, b, rec = expert_factor_names(job.params.module, k)
            factors[job.params.module] = (sink.tensors[a], sink.tensors[b])
            energy += float(sink.tensors[rec][0])
            kept += float(sink.tensors[rec][1])
        write_adapter(build_adapter(factors), target)
        reports[m] = {"adapter": target, "rank": int(rank), "modules": len(factors),
                      "captured": kept / energy if energy > 0 else 1.0, "device": resolve_device(options.device).type}
    return reports


METHODS = (TwinMerging(),)
