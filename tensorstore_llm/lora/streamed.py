"""Streamed per-module LoRA jobs whose outputs are small: extraction and SVD initialisation.

The engine reads one module's tensors at a time (W_base and W_ft for an extraction, W0 for
PiSSA / GOAT), runs a whole-tensor op of :mod:`tensorstore_llm.ops.lora_streamed` and hands the
factors to a :class:`MemorySink`: an adapter is a few percent of its model, so it is assembled in
memory and then committed as one ``lora`` artifact (:mod:`.artifacts`). The residual base of an
SVD initialisation is a full checkpoint and streams into the store like a merge (``lora_merge``
with scaling -s).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..dtypes import by_name
from ..engine.options import RunOptions
from ..engine.plan import WHOLE, InputRef, Plan, TensorJob
from ..errors import InvalidParameter, ShapeMismatch, TensorNotFound
from ..io.base import TensorMeta, TensorSource
from ..ops.lora import LoraMergeParams
from ..ops.lora_extract import SVD_CHOICES, svd_method_for
from ..ops.lora_streamed import LoraExtractParams, SvdInitParams, expert_names, factor_names
from .peft_format import LoraAdapter, build_adapter

SKIP_ROLES = ("embed", "lm_head", "wte", "wpe")


class MemorySink:
    """A TensorSink that keeps every output in memory (``tensors``): for small outputs (LoRA
    factors, per-module records) that are post-processed before they are committed."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self._metas: dict[str, TensorMeta] = {}
        self._parts: dict[str, list] = {}

    def prepare(self, metas) -> None:
        self._metas = {m.name: m for m in metas}

    def preferred_rows(self, meta) -> int:
        return 1

    def completed(self) -> dict[str, str]:
        return {}

    def write_rows(self, name: str, start: int, block) -> None:
        self._parts.setdefault(name, []).append(block.clone())

    def finish(self, name: str) -> str:
        parts = self._parts.pop(name, [])
        meta = self._metas[name]
        value = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.tensors[name] = value.reshape(meta.shape).to(by_name(meta.dtype).torch)
        return "memory"

    def close(self) -> None:
        pass

    def abort(self) -> None:
        self.tensors.clear()


def target_modules(metas: dict[str, TensorMeta], targets: list[str] | None, where: str) -> list[str]:
    """Modules whose 2-D ``.weight`` a LoRA goes on: the named ones (exact names or suffixes such
    as ``q_proj``), or every 2-D weight but embeddings and the LM head."""
    mods = [n[: -len(".weight")] for n, m in metas.items() if n.endswith(".weight") and len(m.shape) == 2]
    if not targets:
        return [m for m in mods if not any(x in m for x in SKIP_ROLES)]
    missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in mods)]
    if missing:
        raise TensorNotFound(f"{where}: target module {missing[0]!r} matches no 2-D weight of the base")
    return [m for m in mods if any(m == t or m.endswith("." + t) for t in targets)]


def is_embedding(module: str) -> bool:
    """Whether ``module`` is an input embedding (PEFT puts an embedding LoRA on it)."""
    return any(x in module for x in ("embed_tokens", "wte", "word_embeddings"))


def check_rank(rank: int, shape: tuple[int, ...], module: str, where: str) -> None:
    """InvalidParameter unless 1 <= rank <= min(out, in)."""
    if not 1 <= rank <= min(shape):
        raise InvalidParameter(f"{where}: rank {rank} for {module!r} must be in [1, min(out, in) = {min(shape)}] "
                               f"(its weight is {tuple(shape)})")


EXACT_IN_FP32 = ("bfloat16", "float16", "float32")


def held_dtype(base_dtype: str, ft_dtype: str, compute_dtype: str = "float32") -> str:
    """The dtype an extraction job's inputs reach its op in: their stored dtype when both share
    one that fp32 holds exactly and the engine computes in fp32 (the op forms the fp32 delta
    itself, so the engine need not keep an fp32 copy of each input beside it), else fp32."""
    if base_dtype == ft_dtype and base_dtype in EXACT_IN_FP32 and compute_dtype == "float32":
        return base_dtype
    return "float32"


@dataclass
class Extraction:
    """An extracted adapter and its report: per module rank and captured energy fraction."""

    adapter: LoraAdapter
    modules: dict[str, dict] = field(default_factory=dict)
    totals: dict = field(default_factory=dict)


def extract(base: TensorSource, ft: TensorSource, *, rank: int | None = None, energy: float | None = None,
            max_rank: int = 128, targets: list[str] | None = None, where: str = "lora extract",
            sink=None, svd: str = "auto", options: RunOptions | None = None, **run_options) -> Extraction:
    """A LoRA adapter approximating ``ft - base``, streamed one target module at a time.

    Each module gets the rank-``rank`` truncated SVD of its delta, or, with ``energy``, the
    smallest rank <= ``max_rank`` whose singular values keep that fraction of ||delta||_F^2.
    ``svd`` picks the method per module (:func:`ops.lora_extract.svd_method_for`): ``exact`` is
    the Gram route (the exact truncation to fp32 rounding), ``randomized`` the seeded randomised
    SVD, ``auto`` exact up to min(out, in) = 4096. The report gives the captured fraction and the
    method per module and the captured fraction in total (sum of captured sigma^2 over the sum of
    ||delta||^2). ``options`` / ``run_options``: how to run (:class:`RunOptions`, or its fields as
    keywords); the seed is drawn from by the randomised SVD only.

    Raises:
        TensorNotFound / ShapeMismatch when the two models do not pair up, InvalidParameter for
        a rank outside [1, min(out, in)]. Nothing is computed then.
    Example: ``extract(base_src, ft_src, rank=64, max_memory="512M").adapter``.
    """
    from ..engine import Executor

    opts = RunOptions.of(options, **run_options)
    if (rank is None) == (energy is None):
        raise InvalidParameter(f"{where}: give exactly one of --rank or --energy")
    if svd not in SVD_CHOICES:
        raise InvalidParameter(f"{where}: --svd must be one of {', '.join(SVD_CHOICES)}, got {svd!r}")
    if energy is not None and not 0 < energy <= 1:
        raise InvalidParameter(f"{where}: --energy must be in (0, 1], got {energy}")
    bm, fm = {m.name: m for m in base.metas()}, {m.name: m for m in ft.metas()}
    jobs = []
    for module in target_modules(bm, targets, where):
        name = module + ".weight"
        if name not in fm:
            raise TensorNotFound(f"{where}: the fine-tune has no tensor {name!r}")
        if fm[name].shape != bm[name].shape:
            raise ShapeMismatch(f"{where}: {name} is {fm[name].shape} in the fine-tune, {bm[name].shape} in the base")
        out_dim, in_dim = bm[name].shape
        r = rank if rank is not None else min(max_rank, out_dim, in_dim)
        check_rank(r, bm[name].shape, module, where)
        a, b, rec = factor_names(module)
        jobs.append(TensorJob(TensorMeta(a, (r, in_dim), "float32"), "lora_extract",
                              (("base", InputRef("base", name, WHOLE)), ("ft", InputRef("ft", name, WHOLE))),
                              LoraExtractParams(rank=r, module=module, method=svd_method_for(svd, (out_dim, in_dim))),
                              extra_outputs=(TensorMeta(b, (out_dim, r), "float32"), TensorMeta(rec, (1,), "float32")),
                              compute_dtype=held_dtype(bm[name].dtype, fm[name].dtype)))
    plan = Plan(jobs, {"base": base, "ft": ft})
    plan.validate(where)
    sink = MemorySink() if sink is None else sink   # a StagedFactorSink (lora/resumable.py) resumes
    Executor(plan, sink, opts).run()
    factors, kinds, report = {}, {}, Extraction(adapter=None)
    captured_total = delta_total = 0.0
    for job in jobs:
        module = job.params.module
        a, b, rec = factor_names(module)
        A, B = sink.tensors[a], sink.tensors[b]
        sigma = A.double().square().sum(dim=1)                  # A = sqrt(S) V^T: row i has norm^2 sigma_i
        delta_energy = float(sink.tensors[rec][0])
        keep = A.shape[0]
        if energy is not None and delta_energy > 0:
            cum = torch.cumsum(sigma.square(), 0) / delta_energy
            hit = (cum >= energy - 1e-12).nonzero()
            keep = int(hit[0]) + 1 if hit.numel() else keep
        captured = float(sigma[:keep].square().sum())
        A, B = A[:keep].contiguous(), B[:, :keep].contiguous()
        if is_embedding(module):      # PEFT's embedding LoRA: delta = (B_e A_e)^T, A_e: r x vocab, B_e: dim x r
            A, B = B.T.contiguous(), A.T.contiguous()
            kinds[module] = "embedding"
        factors[module] = (A, B)
        report.modules[module] = {"rank": keep, "captured": captured / delta_energy if delta_energy > 0 else 1.0,
                                  "svd": "exact" if job.params.method == "gram" else job.params.method}
        captured_total += captured
        delta_total += delta_energy
    # one rank everywhere: alpha = r, s = 1, so B / s == B and build_adapter need not copy every B
    one_rank = len({A.shape[0] for A, _ in factors.values()}) == 1
    report.adapter = build_adapter(factors, kinds=kinds, fold_scaling=not one_rank)
    report.totals = {"captured": captured_total / delta_total if delta_total > 0 else 1.0, "modules": len(factors),
                     "num_params": report.adapter.num_params()}
    return report


def svd_init(base: TensorSource, *, rank: int, method: str = "pissa", experts: int = 1, alpha: float | None = None,
             targets: list[str] | None = None, where: str = "lora init", sink=None,
             options: RunOptions | None = None, **run_options) -> list[LoraAdapter]:
    """PiSSA / GOAT adapters of ``base``, one target module at a time (exact fp32 SVD of W0).

    Returns one adapter per expert (PiSSA: one); the residual base comes from
    :func:`residual_plan`. Each adapter's update is s B A with s = alpha / rank.
    ``options`` / ``run_options``: how to run (:class:`RunOptions`, or its fields as keywords).
    Example: ``svd_init(base_src, rank=16, method="goat", experts=2, max_memory="512M")``.
    """
    from ..engine import Executor

    opts = RunOptions.of(options, **run_options)

    n = 1 if method == "pissa" else experts
    alpha = float(rank if alpha is None else alpha)
    scaling = alpha / rank
    metas = {m.name: m for m in base.metas()}
    jobs = []
    for module in target_modules(metas, targets, where):
        shape = metas[module + ".weight"].shape
        check_rank(rank * n, shape, module, where)
        outs = []
        for e in range(n):
            a, b = expert_names(module, e)
            outs += [TensorMeta(a, (rank, shape[1]), "float32"), TensorMeta(b, (shape[0], rank), "float32")]
        jobs.append(TensorJob(outs[0], "svd_init_factors", (("w", InputRef("base", module + ".weight", WHOLE)),),
                              SvdInitParams(rank=rank, module=module, scaling=scaling, experts=n, method=method),
                              extra_outputs=tuple(outs[1:])))
    plan = Plan(jobs, {"base": base})
    plan.validate(where)
    sink = MemorySink() if sink is None else sink   # a StagedFactorSink (lora/resumable.py) resumes
    Executor(plan, sink, opts).run()
    adapters = []
    for e in range(n):
        factors = {j.params.module: (sink.tensors[expert_names(j.params.module, e)[0]],
                                     sink.tensors[expert_names(j.params.module, e)[1]]) for j in jobs}
        adapters.append(build_adapter(factors, alpha=alpha, fold_scaling=False))
    return adapters


def residual_plan(base: TensorSource, adapters: list[LoraAdapter], factors: TensorSource, *,
                  where: str = "lora init") -> Plan:
    """W0 - sum_e s B_e A_e for every target (fp32, so residual + adapters == W0 to fp32
    rounding), every other tensor copied. ``factors`` holds ``<module>.A`` / ``<module>.B``:
    the experts' factors concatenated along the rank (see :func:`stacked_factors`)."""
    targets = {m.weight_name: m for m in adapters[0].modules.values()}
    jobs = []
    for meta in base.metas():
        w = InputRef("base", meta.name)
        m = targets.get(meta.name)
        if m is None:
            jobs.append(TensorJob(meta, "copy", (("x", w),)))
            continue
        out = TensorMeta(meta.name, meta.shape, "float32")
        jobs.append(TensorJob(out, "lora_merge", (("w", w), ("a", InputRef("factors", m.module + ".A", WHOLE)),
                                                 ("b", InputRef("factors", m.module + ".B", WHOLE))),
                              LoraMergeParams(scaling=-m.scaling)))
    plan = Plan(jobs, {"base": base, "factors": factors})
    plan.validate(where)
    return plan


def stacked_factors(adapters: list[LoraAdapter]) -> dict[str, torch.Tensor]:
    """``<module>.A`` (sum r x in) and ``<module>.B`` (out x sum r) of several experts."""
    out = {}
    for module in adapters[0].modules:
        out[module + ".A"] = torch.cat([ad.modules[module].A.float() for ad in adapters], dim=0)
        out[module + ".B"] = torch.cat([ad.modules[module].B.float() for ad in adapters], dim=1)
    return out
