"""Statistics ops: run as reduction jobs (passes only, no output written), so every analysis that
decides a plan streams with the engine's memory budget, device, progress and resume.

- ``sign_conflicts``: Mediator's per-tensor count of entries where two task vectors have opposite
  signs (summed over model pairs), and the number of pair-entries compared. Integer counts, so
  the totals do not depend on blocking.
"""
from __future__ import annotations

from .layers import conflict_counts
from .registry import StatsPass, op


def _conflicts_map(ctx, params, base, models):
    conflicts, total = conflict_counts(base, list(models))
    return {"conflicts": conflicts, "total": total}


def _add(a, b):
    return {"conflicts": a["conflicts"] + b["conflicts"], "total": a["total"] + b["total"]}


def _conflicts_reduce(params, partials, ctx):
    out = {"conflicts": 0, "total": 0}
    for p in partials:
        out = _add(out, p)
    return out


@op("sign_conflicts", inputs=("base", "models*"), temps=lambda n: n + 2,
    passes=(StatsPass(_conflicts_map, _conflicts_reduce, _add),))
def sign_conflicts(ctx, params, base, models):
    """Opposite-sign counts between task vectors (Mediator); a reduction: its record is the result."""
    return base
