"""Fine-tuning diff statistics, per tensor and per layer, streamed by the engine's reduction jobs.

For each diff Δ = fine-tune − base (``tsllm diff-stats``):

- relative norm ‖Δ‖ / ‖W‖ (W: the base weight);
- the share of weights whose value changed (in the stored dtype, and after rounding to bf16);
- the share of ‖Δ‖² in the top ``rank`` singular directions, the stable rank ‖Δ‖²_F / σ₁², and
  the rank holding 90% of ‖Δ‖² when the sketch reaches it (randomised SVD, streamed by rows:
  see :mod:`tensorstore_llm.ops.delta`);

and between every two diffs the sign-conflict ratio (share of weights whose two deltas have
opposite signs, Mediator's measure) and the cosine of the two deltas. A layer's figures pool its
tensors (sums of squares, counts, dot products), so they are norms of the layer's whole delta.
Nothing here reads rows: one ``diff_stats`` reduction job per tensor does, within ``max_memory``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..default_budget import DEFAULT_MAX_MEMORY
from ..dtypes import by_name
from ..errors import InvalidParameter, ShapeMismatch
from ..io.base import TensorSource
from ..ops.layers import layer_key

ENERGY_TARGET = 0.9


@dataclass
class DiffStats:
    """Per-tensor and per-layer rows of one or several diffs (see the module docstring)."""

    labels: list[str]
    rank: int
    tensors: list[dict] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"labels": self.labels, "rank": self.rank, "tensors": self.tensors, "layers": self.layers,
                "totals": self.totals}


def diff_stats(bases: list[TensorSource], targets: list[TensorSource], *, base_of: list[int] | None = None,
               labels: list[str] | None = None, names: list[str] | None = None, rank: int = 16,
               power_iters: int = 2, seed: int = 0, max_memory=DEFAULT_MAX_MEMORY, device="cpu",
               progress: bool | None = False) -> DiffStats:
    """Statistics of the diffs ``targets[i] − bases[base_of[i]]``, one reduction job per tensor.

    Args:
        bases, targets: opened TensorSources; every float tensor of ``targets[0]`` (or ``names``)
            is analysed; each must exist with the same shape and dtype in every source.
        base_of: for each target the index of its base (default: 0 for all).
        labels: a name per diff for the tables (default: "diff1", "diff2", ...).
        rank: singular directions whose energy share is reported (sketch: rank + 8).
        power_iters: subspace iterations of the randomised SVD (two read passes each).
    Returns:
        DiffStats. Raises ShapeMismatch / TensorNotFound naming the tensor and the input.

    Example:
        >>> s = diff_stats([base_src], [ft_src], max_memory="512M")      # doctest: +SKIP
        >>> s.layers[0]["rel_norm"][0] > 0
        True
    """
    from ..engine.executor import Executor
    from ..engine.options import RunOptions
    from ..engine.plan import InputRef, Plan, TensorJob
    from ..ops import delta as _delta_ops  # noqa: F401  (registers diff_stats)
    from ..ops.delta import DiffStatsParams

    if not targets or not bases:
        raise InvalidParameter("diff-stats needs at least one diff (a fine-tune and its base)")
    base_of = list(base_of) if base_of is not None else [0] * len(targets)
    if len(base_of) != len(targets) or any(not 0 <= b < len(bases) for b in base_of):
        raise InvalidParameter(f"diff-stats: base_of {base_of} does not map {len(targets)} diffs onto {len(bases)} bases")
    labels = labels or [f"diff{i + 1}" for i in range(len(targets))]
    sources = {**{f"base{j}": b for j, b in enumerate(bases)}, **{f"target{i}": t for i, t in enumerate(targets)}}
    params = DiffStatsParams(rank=rank, power_iters=power_iters, seed=seed, base_of=tuple(base_of))
    jobs = []
    for name in names if names is not None else list(targets[0].keys()):
        meta = _check_tensor(name, sources, targets, bases, base_of)
        if meta is None:
            continue
        inputs = (("bases", tuple(InputRef(f"base{j}", name) for j in range(len(bases)))),
                  ("targets", tuple(InputRef(f"target{i}", name) for i in range(len(targets)))))
        jobs.append(TensorJob(meta, "diff_stats", inputs, params, reduce_only=True))
    executor = Executor(Plan(jobs, sources), None,
                        RunOptions(device=device, max_memory=max_memory, seed=seed, progress=progress), desc="diff stats")
    executor.run()
    out = DiffStats(labels, rank)
    for job in jobs:
        record = executor.records.get(job.output.name) or {}
        if record:
            out.tensors.append(_tensor_row(job.output, record, rank))
    out.layers = _pool(out.tensors, "layer")
    out.totals = _pool(out.tensors, None)[0] if out.tensors else {}
    return out


def _check_tensor(name, sources, targets, bases, base_of):
    """The target's meta when ``name`` is a float tensor present alike in every input, else None
    (integer tensors); ShapeMismatch naming the input otherwise."""
    from ..errors import TensorNotFound

    first = targets[0].meta(name)
    if not by_name(first.dtype).is_float or first.numel == 0:
        return None
    for key, src in sources.items():
        try:
            meta = src.meta(name)
        except TensorNotFound:
            raise TensorNotFound(f"diff-stats: tensor {name!r} is missing from {key} ({getattr(src, 'path', key)})") from None
        if meta.shape != first.shape:
            raise ShapeMismatch(f"diff-stats: tensor {name!r} has shape {list(meta.shape)} in {key} "
                                f"({getattr(src, 'path', key)}) but {list(first.shape)} in target0")
    return first


def _tensor_row(meta, record: dict, rank: int) -> dict:
    per = record["per"]
    numel = record["numel"]
    row = {"name": meta.name, "layer": layer_key(meta.name), "shape": list(meta.shape), "numel": numel,
           "delta2": [p["delta2"] for p in per], "base2": [p["base2"] for p in per],
           "changed": [p["changed"] for p in per], "changed_bf16": [p["changed_bf16"] for p in per],
           "rel_norm": [_sqrt_ratio(p["delta2"], p["base2"]) for p in per],
           "changed_share": [p["changed"] / numel for p in per],
           "changed_bf16_share": [p["changed_bf16"] / numel for p in per]}
    if all("singular_values" in p for p in per):
        row["top_energy2"] = [sum(s * s for s in p["singular_values"][:rank]) for p in per]
        row["energy_share"] = [_share(e, p["delta2"]) for e, p in zip(row["top_energy2"], per)]
        row["stable_rank"] = [p["delta2"] / p["singular_values"][0] ** 2 if p["singular_values"] and p["singular_values"][0] > 0
                              else None for p in per]
        row["rank90"] = [_rank_for(p["singular_values"], p["delta2"]) for p in per]
    pairs = record.get("pairs", [])
    row["dot"] = [p["dot"] for p in pairs]
    row["conflicts"] = [p["conflicts"] for p in pairs]
    row["conflict_ratio"] = [p["conflicts"] / numel for p in pairs]
    row["cosine"] = [_cosine(p["dot"], row["delta2"][i], row["delta2"][j]) for p, (i, j) in zip(pairs, _pair_index(len(per)))]
    return row


def _pool(rows: list[dict], key: str | None) -> list[dict]:
    """Rows pooled per layer (``key`` = "layer") or over everything (``key`` None)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[key] if key else "all", []).append(row)
    out = []
    for name in sorted(groups, key=_layer_order):
        members = groups[name]
        n = len(members[0]["delta2"])
        numel = sum(r["numel"] for r in members)
        d2 = [sum(r["delta2"][i] for r in members) for i in range(n)]
        b2 = [sum(r["base2"][i] for r in members) for i in range(n)]
        svd = [r for r in members if "top_energy2" in r]
        pooled = {"layer": name, "tensors": len(members), "numel": numel,
                  "rel_norm": [_sqrt_ratio(d2[i], b2[i]) for i in range(n)],
                  "changed_share": [sum(r["changed"][i] for r in members) / numel for i in range(n)],
                  "changed_bf16_share": [sum(r["changed_bf16"][i] for r in members) / numel for i in range(n)],
                  "energy_share": [_share(sum(r["top_energy2"][i] for r in svd), sum(r["delta2"][i] for r in svd))
                                   if svd else None for i in range(n)]}
        pairs = _pair_index(n)
        pooled["conflict_ratio"] = [sum(r["conflicts"][p] for r in members) / numel for p in range(len(pairs))]
        pooled["cosine"] = [_cosine(sum(r["dot"][p] for r in members), d2[i], d2[j]) for p, (i, j) in enumerate(pairs)]
        out.append(pooled)
    return out


def _pair_index(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def _layer_order(key: str):
    return (key != "embed", key == "final", int(key) if key.isdigit() else 0, key)


def _sqrt_ratio(a: float, b: float) -> float:
    return math.sqrt(a / b) if b > 0 else (0.0 if a == 0 else math.inf)


def _share(part: float, total: float) -> float:
    return part / total if total > 0 else 1.0


def _cosine(dot: float, a2: float, b2: float) -> float | None:
    return dot / math.sqrt(a2 * b2) if a2 > 0 and b2 > 0 else None


def _rank_for(singular_values: list[float], total: float) -> int | None:
    """Smallest rank whose singular values hold ENERGY_TARGET of ``total``; None beyond the sketch."""
    if total <= 0:
        return 0
    run = 0.0
    for r, s in enumerate(singular_values, 1):
        run += s * s
        if run >= ENERGY_TARGET * total * (1 - 1e-12):
            return r
    return None


# -- presentation ---------------------------------------------------------------------------------

def format_table(stats: DiffStats, per_tensor: bool = True) -> list[str]:
    """Text tables: per tensor (when ``per_tensor``), then per layer, then the total."""
    lines = []
    n = len(stats.labels)
    pairs = _pair_index(n)
    head = f"{'rel‖Δ‖':>9} {'changed':>8} {'bf16 chg':>8} {f'E top{stats.rank}':>8}"
    pair_head = "".join(f" {f'conf {i + 1}-{j + 1}':>9} {f'cos {i + 1}-{j + 1}':>8}" for i, j in pairs)
    for i, label in enumerate(stats.labels):
        lines.append(f"diff {i + 1}: {label}")
    if per_tensor:
        lines.append(f"{'tensor':52} {'diff':>4} {head} {'st.rank':>8} {'r@90%':>6}" + pair_head)
        for row in stats.tensors:
            for i in range(n):
                svd = "energy_share" in row
                extra = "".join(f" {row['conflict_ratio'][p]:>9.4f} {_fmt(row['cosine'][p], 8, 4)}" for p in range(len(pairs))) if i == 0 else ""
                lines.append(f"{row['name'][-52:]:52} {i + 1:>4} {row['rel_norm'][i]:>9.3e} {row['changed_share'][i]:>8.2%} "
                             f"{row['changed_bf16_share'][i]:>8.2%} {_fmt(row['energy_share'][i] if svd else None, 8, 3)} "
                             f"{_fmt(row['stable_rank'][i] if svd else None, 8, 1)} "
                             f"{_fmt(row['rank90'][i] if svd else None, 6, 0, '>' + str(stats.rank + 8) if svd else '-')}" + extra)
    lines.append(f"{'layer':>6} {'diff':>4} {head}" + pair_head)
    for row in [*stats.layers, {**stats.totals, "layer": "total"}] if stats.totals else stats.layers:
        for i in range(n):
            extra = "".join(f" {row['conflict_ratio'][p]:>9.4f} {_fmt(row['cosine'][p], 8, 4)}" for p in range(len(pairs))) if i == 0 else ""
            lines.append(f"{row['layer']:>6} {i + 1:>4} {row['rel_norm'][i]:>9.3e} {row['changed_share'][i]:>8.2%} "
                         f"{row['changed_bf16_share'][i]:>8.2%} {_fmt(row['energy_share'][i], 8, 3)}" + extra)
    return lines


def _fmt(value, width: int, digits: int, missing: str = "-") -> str:
    if value is None:
        return f"{missing:>{width}}"
    return f"{value:>{width}.{digits}f}" if digits else f"{int(value):>{width}d}"


def plot(stats: DiffStats, path: str) -> str:
    """Draw the per-layer figure to ``path`` (PNG): relative norm, changed share, top-r energy
    share per diff, and sign-conflict ratio and cosine per pair of diffs. Needs matplotlib (the
    ``plot`` extra); MissingDependency otherwise."""
    from ..errors import MissingDependency

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependency("--plot needs matplotlib: pip install 'tensorstore-llm[plot]'") from None
    layers = stats.layers
    x = list(range(len(layers)))
    ticks = [row["layer"] for row in layers]
    pairs = _pair_index(len(stats.labels))
    panels = [("relative norm ‖Δ‖/‖W‖", "rel_norm", True), ("share of weights changed (bf16)", "changed_bf16_share", False),
              (f"share of ‖Δ‖² in top {stats.rank} directions", "energy_share", False)]
    rows = len(panels) + (1 if pairs else 0)
    fig, axes = plt.subplots(rows, 1, figsize=(max(6.0, 0.28 * len(x) + 3), 2.4 * rows), sharex=True, squeeze=False)
    for ax, (title, key, log) in zip(axes[:, 0], panels):
        for i, label in enumerate(stats.labels):
            ys = [row[key][i] if row[key][i] is not None else float("nan") for row in layers]
            ax.plot(x, ys, marker="o", markersize=3, label=label)
        ax.set_title(title, fontsize=9)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if pairs:
        ax = axes[-1, 0]
        for p, (i, j) in enumerate(pairs):
            tag = f"{stats.labels[i]} vs {stats.labels[j]}"
            ax.plot(x, [row["conflict_ratio"][p] for row in layers], marker="o", markersize=3, label=f"sign conflict, {tag}")
            ax.plot(x, [row["cosine"][p] if row["cosine"][p] is not None else float("nan") for row in layers],
                    marker="s", markersize=3, linestyle="--", label=f"cosine, {tag}")
        ax.set_title("between diffs", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].legend(fontsize=7)
    axes[-1, 0].set_xticks(x)
    axes[-1, 0].set_xticklabels(ticks, fontsize=7, rotation=90)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
