"""Delta ops: lossy delta codecs as streamed engine ops, their weight error, and diff statistics.

Lossy ops (``delta_bf16``, ``delta_low_rank``, ``delta_top_k``, ``delta_dare``,
``delta_bitdelta``, ``delta_mixed_svd``) take ``base`` and ``target`` (the fine-tune) and return
the reconstruction ``base + Δ̂`` that the codec of the same name (:mod:`tensorstore_llm.diff.codecs`)
decodes to; the executor rounds it to the output dtype. Tensors with fewer than two dimensions
(norms, biases) are returned exact. Element-wise codecs stream by row blocks (``bf16``, ``dare``,
per-row ``bitdelta``; per-matrix BitDelta first sums |Δ| in a statistics pass); the SVD codecs
and top-k need the whole tensor and declare it (``rowwise=False``).

Reductions (no output written, a small record per tensor):

- ``delta_error``: ‖recon − target‖², ‖target − base‖², ‖target‖² in fp64 per tile, folded in tile
  order (tiles sit on a fixed grid, so the sums do not depend on --max-memory).
- ``diff_stats``: per diff Δ_i = target_i − base: ‖Δ‖², ‖W‖², how many values changed (in the
  stored dtype and after rounding to bf16); between diffs: dot products and opposite-sign
  counts (Mediator's measure); and the top singular values of Δ by a streamed randomised SVD
  (Halko, Martinsson & Tropp 2011): Y = ΔΩ by rows, Q = qr(Y); ``power_iters`` times
  Z = ΔᵀQ (summed over rows), Y = Δ qr(Z); finally B = QᵀΔ and σ ≈ svdvals(B). Each product is
  one read pass over the rows, so no tensor is ever held whole.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .registry import StatsPass, op

LOSSY_CODECS = ("bf16", "low-rank", "top-k", "dare", "bitdelta", "mixed-svd")


def op_name(codec: str) -> str:
    """The op that reconstructs with lossy codec ``codec`` ("low-rank" -> "delta_low_rank")."""
    return "delta_" + codec.replace("-", "_")


def _codec(name: str, params, **extra):
    from ..diff.codecs import get_codec

    values = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)} if params is not None else {}
    return get_codec(name, **values, **extra)


def _reconstruct(codec, ctx, base, target):
    """``base + Δ̂`` for one block (exact for tensors with fewer than two dimensions)."""
    if base.dim() < 2:
        return target
    return base + codec.approximate(target - base, ctx.output, ctx.start).approx


# -- lossy reconstruction ops ---------------------------------------------------------------------

@op(op_name("bf16"), inputs=("base", "target"), temps=3)
def delta_bf16(ctx, params, base, target):
    """base + bf16(Δ), by rows."""
    return _reconstruct(_codec("bf16", None), ctx, base, target)


@dataclass(frozen=True)
class LowRankParams:
    rank: int | None = None
    energy: float | None = None
    power_iters: int = 2
    seed: int = 0

    def __post_init__(self):
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of rank or energy")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")


@op(op_name("low-rank"), inputs=("base", "target"), params=LowRankParams, rowwise=False, temps=4)
def delta_low_rank(ctx, params, base, target):
    """base + truncated randomised SVD of Δ (bf16 factors); whole tensor."""
    return _reconstruct(_codec("low-rank", params), ctx, base, target)


@dataclass(frozen=True)
class TopKParams:
    density: float = 0.1

    def __post_init__(self):
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")


@op(op_name("top-k"), inputs=("base", "target"), params=TopKParams, rowwise=False, temps=4)
def delta_top_k(ctx, params, base, target):
    """base + the ``density`` share of largest |Δ| (bf16 values); whole tensor (one threshold)."""
    return _reconstruct(_codec("top-k", params), ctx, base, target)


@dataclass(frozen=True)
class DareParams:
    keep: float = 0.1

    def __post_init__(self):
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")


@op(op_name("dare"), inputs=("base", "target"), params=DareParams, random=True, temps=4)
def delta_dare(ctx, params, base, target):
    """base + DARE(Δ) with rescale; the mask is the ``dare`` codec's with seed = the run seed,
    drawn per canonical row group, so any blocking gives the same result."""
    return _reconstruct(_codec("dare", params, seed=ctx.seed), ctx, base, target)


@dataclass(frozen=True)
class BitDeltaParams:
    per_row: bool = False


def _abs_sum_map(ctx, params, base, target):
    if base.dim() < 2:
        return {"abs_sum": 0.0, "count": 0}
    return {"abs_sum": float((target - base).abs().double().sum()), "count": target.numel()}


def _abs_sum_fold(a, b):
    return {"abs_sum": a["abs_sum"] + b["abs_sum"], "count": a["count"] + b["count"]}


def _abs_sum_reduce(params, partials, ctx):
    total = {"abs_sum": 0.0, "count": 0}
    for p in partials:
        total = _abs_sum_fold(total, p)
    return {"mean_abs": total["abs_sum"] / total["count"] if total["count"] else 0.0}


def _bitdelta_passes(params):
    return () if params is not None and params.per_row else (StatsPass(_abs_sum_map, _abs_sum_reduce, _abs_sum_fold),)


@op(op_name("bitdelta"), inputs=("base", "target"), params=BitDeltaParams, temps=4, passes=_bitdelta_passes)
def delta_bitdelta(ctx, params, base, target):
    """base + sign(Δ)·scale: scale = mean |Δ| of the whole matrix (a statistics pass, so the
    matrix streams by rows) or of each row (``per_row``), rounded to bf16 as the codec stores it."""
    if base.dim() < 2:
        return target
    delta = target - base
    if params.per_row:
        return base + _codec("bitdelta", params).approximate(delta).approx
    scale = float(torch.tensor(ctx.stats["mean_abs"], dtype=torch.float32).to(torch.bfloat16))   # as stored
    return base + torch.where(delta >= 0, scale, -scale)


@dataclass(frozen=True)
class MixedSvdParams:
    groups: tuple = ((2, 8), (32, 3), (64, 2))
    power_iters: int = 2
    seed: int = 0

    def __post_init__(self):
        from ..diff.codecs import get_codec
        from ..errors import CodecError

        try:
            codec = get_codec("mixed-svd", groups=self.groups, power_iters=self.power_iters, seed=self.seed)
        except CodecError as e:
            raise ValueError(str(e)) from None
        object.__setattr__(self, "groups", codec.groups)


@op(op_name("mixed-svd"), inputs=("base", "target"), params=MixedSvdParams, rowwise=False, temps=4)
def delta_mixed_svd(ctx, params, base, target):
    """base + Delta-CoMe-style mixed-precision SVD of Δ; whole tensor."""
    return _reconstruct(_codec("mixed-svd", params), ctx, base, target)


# -- weight error of a reconstruction ---------------------------------------------------------------

def _error_map(ctx, params, base, target, recon):
    err = recon.double() - target.double()
    delta = target.double() - base.double()
    return {"err2": float(err.pow(2).sum()), "delta2": float(delta.pow(2).sum()),
            "weight2": float(target.double().pow(2).sum()), "numel": target.numel()}


def _sum_fold(a, b):
    return {k: a[k] + b[k] for k in a}


def _sum_reduce(params, partials, ctx):
    out = dict(partials[0]) if partials else {}
    for p in partials[1:]:
        out = _sum_fold(out, p)
    return out


@op("delta_error", inputs=("base", "target", "recon"), temps=4,
    passes=(StatsPass(_error_map, _sum_reduce, _sum_fold),))
def delta_error(ctx, params, base, target, recon):
    """Squared weight error of ``recon`` against ``target``, ‖Δ‖² and ‖W‖²; a reduction."""
    return target


# -- diff statistics ------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiffStatsParams:
    """``base_of[i]``: which of the bases diff i is taken against (default: base 0 for all)."""

    rank: int = 16
    oversample: int = 8
    power_iters: int = 2
    seed: int = 0
    base_of: tuple[int, ...] = ()

    def __post_init__(self):
        if self.rank < 1 or self.oversample < 0 or self.power_iters < 0:
            raise ValueError(f"rank >= 1, oversample >= 0 and power_iters >= 0 needed, got {self.rank}, "
                             f"{self.oversample}, {self.power_iters}")

    @property
    def sketch(self) -> int:
        return self.rank + self.oversample


def _deltas(params, bases, targets, exact: bool = False):
    """(Δ_i, base, target) of one tile; Δ in fp64 when ``exact`` (the difference of two fp32
    values is then exact, so norms and dot products are too), else in the compute dtype."""
    bases = list(bases)
    out = []
    for i, t in enumerate(targets):
        b = bases[params.base_of[i] if params.base_of else 0]
        out.append((t.double() - b.double() if exact else t - b, b, t))
    return out


def _omega(ctx, params, cols: int) -> torch.Tensor:
    from ..seeding import seed_for

    k = min(params.sketch, cols)
    return torch.randn(cols, k, generator=seed_for(params.seed, "diff-stats", ctx.output)).to(ctx.device)


def _stats_map(ctx, params, bases, targets):
    items = _deltas(params, bases, targets, exact=True)
    out = {"numel": items[0][0].numel(), "per": [], "pairs": []}
    for d, b, t in items:
        entry = {"delta2": float(d.pow(2).sum()), "base2": float(b.double().pow(2).sum()),
                 "target2": float(t.double().pow(2).sum()), "changed": int((t != b).sum()),
                 "changed_bf16": int((t.to(torch.bfloat16) != b.to(torch.bfloat16)).sum())}
        if d.dim() >= 2:
            entry["y"] = (t - b).reshape(d.shape[0], -1) @ _omega(ctx, params, d[0].numel())   # [rows, k]
        out["per"].append(entry)
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            di, dj = items[i][0], items[j][0]
            out["pairs"].append({"dot": float((di * dj).sum()),
                                 "conflicts": int(((torch.sign(di) * torch.sign(dj)) < 0).sum())})
    return out


def _stats_reduce(params, partials, ctx):
    first = partials[0]
    per = []
    for i in range(len(first["per"])):
        entry = {k: sum(p["per"][i][k] for p in partials) for k in ("delta2", "base2", "target2", "changed", "changed_bf16")}
        if "y" in first["per"][i]:
            entry["q"] = torch.linalg.qr(torch.cat([p["per"][i]["y"] for p in partials])).Q     # [rows, k]
        per.append(entry)
    pairs = [{k: sum(p["pairs"][n][k] for p in partials) for k in ("dot", "conflicts")} for n in range(len(first["pairs"]))]
    return {"numel": sum(p["numel"] for p in partials), "per": per, "pairs": pairs}


def _flat(d):
    return d.reshape(d.shape[0], -1)


def _z_map(ctx, params, bases, targets):
    """Z_i = Δ_iᵀ Q_i[rows] ([cols, k]); summed over tiles."""
    per = ctx.stats["per"]
    return [(_flat(d).T @ per[i]["q"][ctx.start:ctx.stop]) if "q" in per[i] else None
            for i, (d, _, _) in enumerate(_deltas(params, bases, targets))]


def _y_map(ctx, params, bases, targets):
    """Y_i = Δ_i Q'_i ([rows, k]); concatenated over tiles."""
    per = ctx.stats["per"]
    return [(_flat(d) @ per[i]["qr"]) if "qr" in per[i] else None for i, (d, _, _) in enumerate(_deltas(params, bases, targets))]


def _b_map(ctx, params, bases, targets):
    """B_i = Q_i[rows]ᵀ Δ_i ([k, cols]); summed over tiles."""
    per = ctx.stats["per"]
    return [(per[i]["q"][ctx.start:ctx.stop].T @ _flat(d)) if "q" in per[i] else None
            for i, (d, _, _) in enumerate(_deltas(params, bases, targets))]


def _add_lists(a, b):
    return [x + y if x is not None else None for x, y in zip(a, b)]


def _z_reduce(params, partials, ctx):
    total = partials[0]
    for p in partials[1:]:
        total = _add_lists(total, p)
    per = [dict(e) for e in ctx.stats["per"]]
    for e, z in zip(per, total):
        if z is not None:
            e["qr"] = torch.linalg.qr(z).Q                                                        # [cols, k]
    return {"per": per}


def _y_reduce(params, partials, ctx):
    per = [dict(e) for e in ctx.stats["per"]]
    for i, e in enumerate(per):
        if "qr" in e:
            e["q"] = torch.linalg.qr(torch.cat([p[i] for p in partials])).Q
            del e["qr"]
    return {"per": per}


def _b_reduce(params, partials, ctx):
    total = partials[0]
    for p in partials[1:]:
        total = _add_lists(total, p)
    per = [dict(e) for e in ctx.stats["per"]]
    for e, b in zip(per, total):
        e.pop("q", None)
        if b is not None:
            e["singular_values"] = [float(s) for s in torch.linalg.svdvals(b.double())]
    return {"per": per}


def _stats_passes(params):
    passes = [StatsPass(_stats_map, _stats_reduce)]
    for _ in range(params.power_iters if params is not None else 1):
        passes += [StatsPass(_z_map, _z_reduce, _add_lists), StatsPass(_y_map, _y_reduce)]
    return (*passes, StatsPass(_b_map, _b_reduce, _add_lists))


@op("diff_stats", inputs=("bases*", "targets*"), params=DiffStatsParams, temps=lambda n: 4 * n + 4,
    passes=_stats_passes)
def diff_stats(ctx, params, bases, targets):
    """Norms, changed counts, sign conflicts, dot products and top singular values of diffs; a reduction."""
    return targets[0]
