"""``tsllm lora combine``: several adapters of one base, combined on their full deltas B·A.

- ``linear`` as an adapter: the scaled factors are concatenated (exact at rank sum r_i), or
  re-factored to ``rank`` / ``energy`` through QR of the stacked factors with the Eckart-Young
  error per module (:func:`.adapters.combine_adapters`); no out x in matrix is formed.
- ``linear`` merged into a base: the exact concatenated adapter is merged by the streamed merge.
- ``ties`` / ``dare_linear`` (PEFT's rules on the full deltas): merged into a base by the
  ``lora_combine_merge`` op, one module at a time; or, as an adapter, re-factored to ``rank``
  by randomised SVD of each module's combined delta (``lora_combine_factors``), reporting the
  captured energy. A TIES / DARE delta is sparse and full-rank, so no factors can be stacked.
"""
from __future__ import annotations

from ..engine.options import RunOptions
from ..engine.plan import WHOLE, InputRef, Plan, TensorJob
from ..errors import BaseMismatch, InvalidParameter, RecipeError, ShapeMismatch
from ..io.base import TensorMeta
from ..ops.lora_streamed import COMBINE_METHODS, LoraCombineParams, factor_names
from ..runs import resolve_input, run_plan
from ..store.store import Store
from .artifacts import DictSource
from .peft_format import LoraAdapter, build_adapter
from .verb_support import bound_of, check_out_dir, device_type, finish, lora_only, open_adapter_ref


def _same_base(bounds: list[dict], refs: list[str]) -> dict:
    """One binding for adapters that must share their base: the checksums of every weight any of
    them changes; BaseMismatch when two disagree on a weight (or name different base artifacts)."""
    merged: dict[str, str] = {}
    for bound, ref in zip(bounds, refs):
        for name, checksum in (bound.get("checksums") or {}).items():
            if merged.setdefault(name, checksum) != checksum:
                raise BaseMismatch(f"lora combine: {ref} was made for another base than {refs[0]} "
                                   f"({name!r} differs); combine adapters of one base only")
    return {**bounds[0], "checksums": merged}


def _module_factors(adapters: list[LoraAdapter], module: str) -> list:
    parts = [ad.modules.get(module) for ad in adapters]
    shapes = {(m.B.shape[0], m.A.shape[1]) for m in parts if m is not None}
    if len(shapes) > 1:
        raise ShapeMismatch(f"lora combine: module {module!r} has different shapes across adapters: {sorted(shapes)}")
    return parts


def combine(store: Store, adapters: list[str], weights: list[float], *, method: str = "linear",
            density: float = 1.0, rank: int | None = None, energy: float | None = None,
            merge_into: str | None = None, base: str | None = None, name: str | None = None,
            out_dir: str | None = None, options: RunOptions | None = None, **run_options):
    """Combine adapters of one base; see the module notes for what each method produces.

    Args:
        adapters: artifact refs or PEFT directories (directories need ``base`` for the binding).
        weights: one weight per adapter.
        method: linear, ties or dare_linear; ``density`` for ties / dare_linear.
        rank / energy: re-factor the combination as an adapter of this rank (ties / dare_linear:
            ``rank`` only).
        merge_into: a base model to merge the combination into instead (a checkpoint artifact).
        options / run_options: how to run (:class:`RunOptions`, or its fields as keywords).
    Returns:
        :class:`LoraResult` (or the api JobResult of the merge with ``merge_into``), with the
        report: per module rank and error (relative_error, or captured energy).
    Example: ``combine(store, ["math", "code"], [0.5, 0.5], rank=32, name="both")``.
    """
    if method not in COMBINE_METHODS:
        raise InvalidParameter(f"lora combine: --method must be one of {', '.join(COMBINE_METHODS)}, got {method!r}")
    if len(adapters) != len(weights) or len(adapters) < 1:
        raise InvalidParameter(f"lora combine: {len(adapters)} adapters but {len(weights)} weights")
    if not 0 < density <= 1:
        raise InvalidParameter(f"lora combine: --density must be in (0, 1], got {density}")
    if rank is not None and rank < 1:
        raise InvalidParameter(f"lora combine: --rank must be >= 1, got {rank}")
    if merge_into is None and method != "linear" and rank is None:
        raise InvalidParameter(f"lora combine: a {method} combination is full-rank; give --rank to re-factor it "
                               "as an adapter, or --merge-into BASE")
    opts = RunOptions.of(options, **run_options)
    check_out_dir(out_dir)
    opened = [open_adapter_ref(store, a) for a in adapters]
    for o in opened:
        o.source.close()
    loras = [lora_only(o, "lora combine") for o in opened]
    for o, ad in zip(opened, loras):
        if any(m.magnitude is not None for m in ad.modules.values()) or ad.saved_modules:
            raise RecipeError(f"lora combine: {o.ref} has DoRA magnitudes or modules_to_save, which are not "
                              "low-rank updates; merge it into its base instead")
        if rank is not None and merge_into is None:
            from .streamed import check_rank

            for k, m in ad.modules.items():
                check_rank(rank, (m.B.shape[0], m.A.shape[1]), k, "lora combine")
    bound = _same_base([bound_of(store, o, base) for o in opened], adapters)
    parents = [{**o.lineage, "role": "adapter"} for o in opened]
    recipe = {"op": "lora_combine", "method": method, "weights": list(weights), "density": density,
              "rank": rank, "energy": energy}
    if method == "linear":
        from .adapters import combine_adapters

        combined, report = combine_adapters(loras, list(weights), rank=None if merge_into else rank,
                                            energy=None if merge_into else energy)
        if merge_into is None:
            return finish(store, combined, bound, parents=parents, recipe=recipe, name=name, out_dir=out_dir,
                          report={"modules": report.modules, "totals": report.totals})
        return _merge_plan(store, merge_into, bound, parents, recipe, name, out_dir, opts,
                           lambda src: _linear_merge_plan(src, combined))
    if merge_into is not None:
        return _merge_plan(store, merge_into, bound, parents, recipe, name, out_dir, opts,
                           lambda src: _sparse_plan(src, loras, weights, method, density, None))
    return _sparse_adapter(store, loras, weights, method, density, rank, bound, parents, recipe, name, out_dir, opts)


def _linear_merge_plan(base_src, combined: LoraAdapter):
    from .plans import plan_lora_merge

    return plan_lora_merge(base_src, combined, DictSource(combined.state_dict()), where="lora combine")


def _factor_inputs(loras: list[LoraAdapter], module: str, sources: dict) -> tuple:
    """(A_0, B_0, A_1, B_1, ...) refs of the adapters that have ``module`` (WHOLE reads)."""
    refs = []
    for i, ad in enumerate(loras):
        if module in ad.modules:
            a, b, _ = factor_names(module)
            refs += [InputRef(f"adapter{i}", a, WHOLE), InputRef(f"adapter{i}", b, WHOLE)]
    return tuple(refs)


def _sources(loras: list[LoraAdapter]) -> dict:
    out = {}
    for i, ad in enumerate(loras):
        tensors = {}
        for k, m in ad.modules.items():
            a, b, _ = factor_names(k)
            tensors[a], tensors[b] = m.A, m.B
        out[f"adapter{i}"] = DictSource(tensors, f"adapter {i}")
    return out


def _params(loras, weights, module, method, density, rank) -> LoraCombineParams:
    present = [(w, ad.modules[module]) for w, ad in zip(weights, loras) if module in ad.modules]
    transpose = {m.transpose for _, m in present}
    if len(transpose) > 1:
        raise ShapeMismatch(f"lora combine: module {module!r} is stored transposed in some adapters only")
    return LoraCombineParams(weights=tuple(float(w) for w, _ in present), scalings=tuple(m.scaling for _, m in present),
                             method=method, density=density, transpose=transpose.pop(), rank=rank or 0, module=module)


def _sparse_plan(base_src, loras, weights, method, density, _rank):
    sources = _sources(loras)
    modules = sorted({k for ad in loras for k in ad.modules})
    by_weight = {}
    for k in modules:
        _module_factors(loras, k)
        m = next(ad.modules[k] for ad in loras if k in ad.modules)
        by_weight[m.weight_name] = k
    metas = {m.name: m for m in base_src.metas()}
    for ad in loras:
        ad.validate_base({n: m.shape for n, m in metas.items()}, where="the base")
    jobs = []
    for name, meta in metas.items():
        w = InputRef("base", name)
        k = by_weight.get(name)
        if k is None:
            jobs.append(TensorJob(meta, "copy", (("x", w),)))
        else:
            inputs = (("w", w), ("factors", _factor_inputs(loras, k, sources)))
            params = _params(loras, weights, k, method, density, None)
            jobs.append(TensorJob(meta, "lora_combine_merge", inputs, params))
    plan = Plan(jobs, {"base": base_src, **sources})
    plan.validate("lora combine")
    return plan


def _merge_plan(store, merge_into, bound, parents, recipe, name, out_dir, opts: RunOptions, make_plan):
    from .artifacts import check_binding
    from .merge_setup import export_stored

    source, lineage, files = resolve_input(store, merge_into)
    with source:
        mismatched = check_binding(store, bound, source, lineage, where="lora combine")
        if mismatched:
            raise BaseMismatch(f"lora combine: the adapters were made for another base than {merge_into} "
                               f"({len(mismatched)} tensors differ, e.g. {mismatched[0]!r})")
        result = run_plan(store, make_plan(source), kind="checkpoint", parents=[{**lineage, "role": "base"}, *parents],
                          recipe=recipe, files=files, name=name, desc="lora combine", options=opts)
    return export_stored(store, result, out_dir, options=opts)


def _sparse_adapter(store, loras, weights, method, density, rank, bound, parents, recipe, name, out_dir,
                    opts: RunOptions):
    """TIES / DARE combination re-factored to ``rank`` per module (randomised SVD of the delta)."""
    from ..engine import Executor
    from .resumable import StagedFactorSink

    sources = _sources(loras)
    jobs, kinds = [], {}
    for k in sorted({k for ad in loras for k in ad.modules}):
        parts = [m for m in _module_factors(loras, k) if m is not None]
        out_dim, in_dim = parts[0].B.shape[0], parts[0].A.shape[1]
        if rank > min(out_dim, in_dim):
            raise InvalidParameter(f"lora combine: rank {rank} for {k!r} is above min(out, in) = "
                                   f"{min(out_dim, in_dim)}")
        kinds[k] = parts[0].kind
        a, b, rec = factor_names(k)
        jobs.append(TensorJob(TensorMeta(a, (rank, in_dim), "float32"), "lora_combine_factors",
                              (("factors", _factor_inputs(loras, k, sources)),),
                              _params(loras, weights, k, method, density, rank),
                              extra_outputs=(TensorMeta(b, (out_dim, rank), "float32"),
                                             TensorMeta(rec, (1,), "float32"))))
    plan = Plan(jobs, sources)
    plan.validate("lora combine")
    key = ("lora_combine", plan.fingerprint(), opts.seed, device_type(opts))
    with StagedFactorSink(store, key) as sink:   # staged and journaled: a killed run resumes
        Executor(plan, sink, opts).run()
        factors, modules = {}, {}
        for job in jobs:
            a, b, rec = factor_names(job.params.module)
            A, B = sink.tensors[a], sink.tensors[b]
            total = float(sink.tensors[rec][0])
            kept = float(A.double().square().sum(dim=1).square().sum())
            factors[job.params.module] = (A, B)
            modules[job.params.module] = {"rank": rank, "captured": kept / total if total > 0 else 1.0,
                                          "relative_error": max(0.0, 1 - kept / total) ** 0.5 if total > 0 else 0.0}
        combined = build_adapter(factors, kinds=kinds,
                                 fan_in_fan_out=any(m.fan_in_fan_out for ad in loras for m in ad.modules.values()))
        report = {"modules": modules, "totals": {"num_params": combined.num_params()}}
        return finish(store, combined, bound, parents=parents, recipe=recipe, name=name, out_dir=out_dir,
                      report=report, resumed=sink.resumed)


__all__ = ["combine"]
