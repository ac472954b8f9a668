"""Adapter-level LoRA transforms: combine, resize, AdapterDrop, extract, SVD initialisation.

Each takes adapters (:class:`~tensorstore_llm.lora.peft_format.LoraAdapter`) or base tensors
already in memory and returns a new adapter plus a per-module report; the arithmetic is in
:mod:`tensorstore_llm.ops.lora`. Whole tensors are held one module at a time; the streamed
engine path (jobs with several outputs) will call the same kernels per module.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..errors import RecipeError, ShapeMismatch, TensorNotFound
from ..ops import lora as K
from ..seeding import seed_for
from .peft_format import LoraAdapter, build_adapter, layer_index


@dataclass
class Report:
    """Per-module numbers of a transform (``modules``: module -> dict) and totals."""

    modules: dict[str, dict] = field(default_factory=dict)
    totals: dict = field(default_factory=dict)


def _refuse_dora(adapter: LoraAdapter, what: str) -> None:
    dora = [k for k, m in adapter.modules.items() if m.magnitude is not None]
    if dora:
        raise RecipeError(f"{adapter.source or 'adapter'}: {what} works on LoRA updates B @ A; the DoRA magnitude of "
                          f"{dora[0]!r} (and {len(dora) - 1} more) rescales whole rows and is not a low-rank term. "
                          "Merge the DoRA adapter into its base instead")


def _kinds(adapters: Iterable[LoraAdapter]) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for ad in adapters:
        for k, m in ad.modules.items():
            if kinds.setdefault(k, m.kind) != m.kind:
                raise RecipeError(f"module {k!r} is an {kinds[k]} LoRA in one adapter and {m.kind} in another")
    return kinds


def combine_adapters(adapters: list[LoraAdapter], weights: list[float], *, rank: int | None = None,
                     energy: float | None = None) -> tuple[LoraAdapter, Report]:
    """Linear combination sum_i w_i s_i B_i A_i of several adapters of the same base, per module.

    Always on the full deltas: the factors are concatenated ([w_1 s_1 B_1, ...] @ [A_1; ...]), so
    without ``rank`` / ``energy`` the result is exact at rank sum(r_i) and has no cross terms.
    With ``rank`` (or ``energy``) each module is re-factored through QR of the stacked factors
    (never an out x in SVD) and the report gives its Eckart-Young error: ``tail_energy`` =
    sum of the dropped sigma^2 and ``relative_error`` = sqrt(tail / total).

    Args:
        adapters: LoRA adapters (not DoRA) with the same layouts.
        weights: one weight per adapter.
    Returns:
        (adapter whose B @ A per module is the combination, report).
    """
    if len(adapters) != len(weights) or not adapters:
        raise RecipeError(f"{len(adapters)} adapters but {len(weights)} weights")
    for ad in adapters:
        _refuse_dora(ad, "combine")
        if ad.saved_modules:
            raise RecipeError(f"{ad.source or 'adapter'}: modules_to_save ({sorted(ad.saved_modules)[0]}) are whole "
                              "tensors, not LoRA updates; combine them as a checkpoint merge instead")
    kinds = _kinds(adapters)
    fif = {k for ad in adapters for k, m in ad.modules.items() if m.fan_in_fan_out}
    factors, report = {}, Report()
    for module in sorted(kinds):
        parts = [(ad.modules[module].A, ad.modules[module].B, w * ad.modules[module].scaling)
                 for ad, w in zip(adapters, weights) if module in ad.modules]
        shapes = {(a.shape[1], b.shape[0]) for a, b, _ in parts}
        if len(shapes) > 1:
            raise ShapeMismatch(f"module {module!r} has different shapes across adapters: {sorted(shapes)}")
        A, B = K.concat_factors(parts)
        if rank is None and energy is None:
            factors[module] = (A, B)
            report.modules[module] = {"rank": A.shape[0], "relative_error": 0.0}
            continue
        out = K.refactor(A, B, rank=min(rank, A.shape[0]) if rank else None, energy=energy)
        factors[module] = (out.A, out.B)
        report.modules[module] = {"rank": out.rank, "stacked_rank": A.shape[0], "tail_energy": out.tail_energy,
                                  "total_energy": out.total_energy, "relative_error": out.relative_error}
    tail = sum(v.get("tail_energy", 0.0) for v in report.modules.values())
    total = sum(v.get("total_energy", 0.0) for v in report.modules.values())
    report.totals = {"tail_energy": tail, "total_energy": total,
                     "relative_error": (tail / total) ** 0.5 if total else 0.0}
    ad = build_adapter(factors, kinds=kinds, fan_in_fan_out=bool(fif),
                       base_model_name_or_path=adapters[0].config.base_model_name_or_path)
    return ad, report


def resize_adapter(adapter: LoraAdapter, *, rank: int | None = None, energy: float | None = None,
                   auto_budget: bool = False, budget: int | None = None) -> tuple[LoraAdapter, Report]:
    """Truncate an adapter to a smaller rank (DyLoRA-style) by the SVD of s B A via QR of the factors.

    Args:
        rank: the new rank of every module (modules already smaller keep theirs), or
        energy: per module, the smallest rank keeping this fraction of ||s B A||_F^2, or
        auto_budget: with ``rank``, pick per-module ranks (``--rank-pattern auto``) that keep the
            most energy under the parameter budget of rank ``rank`` everywhere (or ``budget``
            parameters when given).
    Returns:
        (resized adapter, report with rank, tail energy and relative error per module).
    """
    _refuse_dora(adapter, "resize")
    spectra, svds = {}, {}
    for k, m in adapter.modules.items():
        svds[k] = K.product_svd(m.A, m.B.float() * m.scaling)         # once per module
        spectra[k] = (svds[k][1], m.A.shape[1] + m.B.shape[0])
    if auto_budget:
        if rank is None and budget is None:
            raise RecipeError("--rank-pattern auto needs --rank (the budget is rank r in every module) or --budget")
        if budget is None:
            budget = sum(min(rank, s.numel()) * cost for s, cost in spectra.values())
        ranks = K.rank_budget(spectra, budget)
    elif rank is not None:
        ranks = {k: min(rank, m.r) for k, m in adapter.modules.items()}
    else:
        ranks = {k: None for k in adapter.modules}
    factors, report = {}, Report()
    for k, m in adapter.modules.items():
        out = K.refactor(m.A, m.B, rank=ranks[k], energy=energy if ranks[k] is None else None, svd=svds[k])
        factors[k] = (out.A, out.B)
        report.modules[k] = {"rank": out.rank, "old_rank": m.r, "tail_energy": out.tail_energy,
                             "total_energy": out.total_energy, "relative_error": out.relative_error}
    new = build_adapter(factors, kinds={k: m.kind for k, m in adapter.modules.items()},
                        fan_in_fan_out=adapter.config.fan_in_fan_out,
                        base_model_name_or_path=adapter.config.base_model_name_or_path)
    new.saved_modules = dict(adapter.saved_modules)
    if adapter.saved_modules:
        new.config.modules_to_save = adapter.config.modules_to_save
    report.totals = {"params_before": adapter.num_params(), "params_after": new.num_params()}
    return new, report


def drop_layers(adapter: LoraAdapter, *, lowest: int | None = None,
                modules: Iterable[str] = ()) -> tuple[LoraAdapter, Report]:
    """AdapterDrop (Rücklé et al. 2021): remove the LoRA of the lowest ``lowest`` layers and/or
    of the named modules (exact names or suffixes such as ``q_proj``).

    Returns:
        (adapter without them, report with the removed modules and ``params_removed``).
    """
    names = list(modules)
    if lowest is None and not names:
        raise RecipeError("nothing to drop: give lowest=k or module names")
    unknown = [n for n in names if not any(k == n or k.endswith("." + n) for k in adapter.modules)]
    if unknown:
        raise TensorNotFound(f"{adapter.source or 'adapter'}: no LoRA module matches {unknown[0]!r}")

    def dropped(k: str) -> bool:
        idx = layer_index(k)
        below = lowest is not None and idx is not None and idx < lowest
        return below or any(k == n or k.endswith("." + n) for n in names)

    keep = {k: m for k, m in adapter.modules.items() if not dropped(k)}
    gone = {k: m for k, m in adapter.modules.items() if dropped(k)}
    if not keep:
        raise RecipeError(f"{adapter.source or 'adapter'}: dropping would remove every LoRA module")
    cfg = type(adapter.config)(**{k: getattr(adapter.config, k) for k in adapter.config._FIELDS},
                               extra=dict(adapter.config.extra))
    cfg.target_modules = sorted(keep)
    new = LoraAdapter(config=cfg, modules=keep, saved_modules=dict(adapter.saved_modules),
                      base_layers={k: v for k, v in adapter.base_layers.items() if k[: -len(".weight")] in keep})
    report = Report(modules={k: {"params": m.num_params} for k, m in gone.items()})
    report.totals = {"params_removed": sum(m.num_params for m in gone.values()), "modules_removed": len(gone),
                     "params_left": new.num_params()}
    return new, report


def _targets(base: Mapping[str, torch.Tensor], targets: Iterable[str] | None) -> list[str]:
    mods = [k[: -len(".weight")] for k, v in base.items() if k.endswith(".weight") and v.ndim == 2]
    if targets is None:
        return [m for m in mods if not any(x in m for x in ("embed", "lm_head", "wte", "wpe"))]
    targets = list(targets)
    chosen = [m for m in mods if any(m == t or m.endswith("." + t) for t in targets)]
    missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in mods)]
    if missing:
        raise TensorNotFound(f"target module {missing[0]!r} matches no 2-D weight of the base")
    return chosen


def extract_adapter(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], *,
                    rank: int | None = None, energy: float | None = None, targets: Iterable[str] | None = None,
                    seed: int = 0, power_iters: int = 2, max_rank: int | None = None) -> tuple[LoraAdapter, Report]:
    """A LoRA adapter approximating a full fine-tune: per target module, the exact truncated SVD of
    W_ft - W_base (fp32; :func:`ops.lora_extract.extract_lora`'s default method) cut at ``rank`` or
    at ``energy``. ``seed`` and ``power_iters`` only matter to the randomised method.

    Args:
        base, finetuned: tensor name -> tensor (same names and shapes for the targets).
        targets: module names or suffixes (default: every 2-D weight except embeddings / lm_head).
        seed: run seed; a randomised projection would use ``seed_for(seed, "lora_extract", module)``.
    Returns:
        (adapter with scaling folded so B @ A is the approximation, report with ``captured``
        energy per module and in total).
    """
    factors, report = {}, Report()
    cap_e = tot_e = 0.0
    for module in _targets(base, targets):
        name = module + ".weight"
        if name not in finetuned:
            raise TensorNotFound(f"fine-tune has no tensor {name!r}")
        if finetuned[name].shape != base[name].shape:
            raise ShapeMismatch(f"{name}: fine-tune {tuple(finetuned[name].shape)} vs base {tuple(base[name].shape)}")
        delta = finetuned[name].float() - base[name].float()
        ex = K.extract_lora(delta, rank=rank, energy=energy, max_rank=max_rank, power_iters=power_iters,
                            generator=seed_for(seed, "lora_extract", module))
        factors[module] = (ex.A, ex.B)
        report.modules[module] = {"rank": ex.rank, "captured": ex.captured, "delta_energy": ex.delta_energy}
        cap_e += ex.captured * ex.delta_energy
        tot_e += ex.delta_energy
    report.totals = {"captured": cap_e / tot_e if tot_e else 1.0, "delta_energy": tot_e}
    return build_adapter(factors), report


def svd_init(base: Mapping[str, torch.Tensor], *, rank: int, targets: Iterable[str] | None = None,
             method: str = "pissa", n_experts: int = 1, alpha: float | None = None
             ) -> tuple[list[LoraAdapter], dict[str, torch.Tensor]]:
    """PiSSA / GOAT initialisation: adapters holding SVD segments of W0 and the residual base.

    ``method="pissa"``: one adapter with the top-``rank`` triplets. ``method="goat"``:
    ``n_experts`` adapters, expert e from segment e of the spectrum (see ``ops.lora.goat_init``).
    The residual tensors (fp32) satisfy residual + sum_e s B_e A_e == W0 to fp32 rounding, so
    base-residual + adapters reproduce the model at initialisation.

    Returns:
        (adapters, residual tensors by base tensor name).
    """
    if method not in ("pissa", "goat"):
        raise RecipeError(f"unknown SVD initialisation {method!r} (pissa, goat)")
    experts = 1 if method == "pissa" else n_experts
    scaling = (alpha if alpha is not None else rank) / rank
    per_expert: list[dict] = [dict() for _ in range(experts)]
    residual = {}
    for module in _targets(base, targets):
        W = base[module + ".weight"]
        init = K.pissa_init(W, rank, scaling) if method == "pissa" else K.goat_init(W, rank, experts, scaling)
        residual[module + ".weight"] = init.residual
        for e, (A, B) in enumerate(init.adapters):
            per_expert[e][module] = (A, B)
    adapters = [build_adapter(f, alpha=alpha if alpha is not None else float(rank), fold_scaling=False)
                for f in per_expert]
    return adapters, residual
