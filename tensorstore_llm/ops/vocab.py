"""Vocabulary statistics: ``row_mean``, a reduction over a tensor's rows (its mean row), used
for the padding rows of a vocabulary padded to a multiple (mergekit's ``pad_to_multiple_of``:
each padding row is the mean of the real token rows). The sums are float64, one partial per
tile folded in row order, rounded once to float32 at the end.
"""
from __future__ import annotations

import torch

from .registry import StatsPass, op


def _sum_map(ctx, params, x):
    return {"sum": x.reshape(x.shape[0], -1).double().sum(0), "rows": int(x.shape[0])}


def _fold(a, b):
    return {"sum": a["sum"] + b["sum"], "rows": a["rows"] + b["rows"]}


def _mean_reduce(params, partials, ctx):
    total = partials[0]
    for p in partials[1:]:
        total = _fold(total, p)
    mean = (total["sum"] / max(1, total["rows"])).to(torch.float32)
    return {"mean": mean.tolist(), "rows": total["rows"]}


@op("row_mean", inputs=("x",), temps=2, passes=(StatsPass(_sum_map, _mean_reduce, _fold),))
def row_mean(ctx, params, x):
    """The mean of ``x``'s rows (float64 sums, rounded once); a reduction: its record is the result."""
    return x
