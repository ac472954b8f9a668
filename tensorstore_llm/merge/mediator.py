"""Streamed analyses that decide a merge plan: Mediator's per-layer sign-conflict table.

The counting runs as reduction jobs of the engine (``ops.stats``), within the memory budget and on
the chosen device, so a 70B model is analysed without being loaded.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..default_budget import DEFAULT_MAX_MEMORY
from ..io.base import TensorSource
from ..ops.layers import gaussian_threshold, layer_key


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


def conflict_table(base: TensorSource, models: list[TensorSource], names: list[str], k_sigma: float, *,
                   max_memory=DEFAULT_MAX_MEMORY, device="cpu", progress: bool | None = False) -> ConflictTable:
    """Fraction of parameters whose task vectors disagree in sign, per layer, and the Gaussian cut.

    Counted by reduction jobs (op ``sign_conflicts``, one per tensor), so the pass over the models
    holds at most ``max_memory`` of tensor data and runs on ``device``.
    """
    from ..engine.executor import Executor
    from ..engine.options import RunOptions
    from ..engine.plan import InputRef, Plan, TensorJob

    sources = {"base": base, **{f"model{i}": m for i, m in enumerate(models)}}
    jobs = []
    for name in names:
        meta = base.meta(name)
        if not meta.numel:
            continue
        inputs = (("base", InputRef("base", name)), ("models", tuple(InputRef(f"model{i}", name) for i in range(len(models)))))
        jobs.append(TensorJob(meta, "sign_conflicts", inputs, reduce_only=True))
    executor = Executor(Plan(jobs, sources), None, RunOptions(device=device, max_memory=max_memory, progress=progress),
                        desc="mediator conflicts")
    executor.run()
    counts: dict[str, list[int]] = {}
    for job in jobs:
        record = executor.records[job.output.name]
        entry = counts.setdefault(layer_key(job.output.name), [0, 0])
        entry[0] += record["conflicts"]
        entry[1] += record["total"]
    ratios = {key: c / t for key, (c, t) in counts.items() if t}
    mu, sigma, threshold = gaussian_threshold(list(ratios.values()), k_sigma)
    return ConflictTable(ratios, mu, sigma, threshold)
