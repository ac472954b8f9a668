"""Streamed analyses that decide a merge plan: Mediator's per-layer sign-conflict table.

Reads row blocks of the base and each model (memory bounded by ``block_bytes`` per input), so a
70B model is analysed without being loaded.
"""
from __future__ import annotations

from dataclasses import dataclass

from .dtypes import by_name
from .io.base import TensorSource
from .ops.layers import conflict_counts, gaussian_threshold, layer_key


@dataclass
class ConflictTable:
    """Per-layer conflict ratios, the Gaussian fit, and which layers are averaged."""

    ratios: dict[str, float]
    mu: float
    sigma: float
    threshold: float

    def averaged(self, key: str) -> bool:
        return self.ratios[key] < self.threshold

    def rows(self) -> list[dict]:
        order = sorted(self.ratios, key=lambda k: (k != "embed", k == "final", int(k) if k.isdigit() else 0))
        return [{"layer": k, "conflict_ratio": round(self.ratios[k], 6),
                 "action": "average" if self.averaged(k) else "expert"} for k in order]

    def to_json(self) -> dict:
        return {"mu": self.mu, "sigma": self.sigma, "threshold": self.threshold, "layers": self.rows()}


def conflict_table(base: TensorSource, models: list[TensorSource], names: list[str], k_sigma: float,
                   block_bytes: int = 64 * 1024 * 1024) -> ConflictTable:
    """Fraction of parameters whose task vectors disagree in sign, per layer, and the Gaussian cut."""
    counts: dict[str, list[int]] = {}
    for name in names:
        meta = base.meta(name)
        if not meta.numel:
            continue
        step = max(1, block_bytes // max(1, meta.row_numel * by_name(meta.dtype).itemsize))
        for start in range(0, meta.rows, step):
            stop = min(meta.rows, start + step)
            b = base.read_rows(name, start, stop).float()
            conflicts, total = conflict_counts(b, [m.read_rows(name, start, stop).float() for m in models])
            entry = counts.setdefault(layer_key(name), [0, 0])
            entry[0] += conflicts
            entry[1] += total
    ratios = {key: c / t for key, (c, t) in counts.items() if t}
    mu, sigma, threshold = gaussian_threshold(list(ratios.values()), k_sigma)
    return ConflictTable(ratios, mu, sigma, threshold)
