"""Pruning kernels: structured gathers, unstructured / N:M masks, and unit scores for plans.

Structured pruning (LLM-Pruner, LoRAM, DarwinLM) removes whole MLP intermediate channels and whole
key-value heads with their query-head group, so the pruned weights are gathers of the full ones:
``gather_rows`` keeps rows ``index`` (q / k / v / gate / up, and their biases) and
``gather_columns`` keeps columns ``index`` (o / down). Both pass stored values through unchanged
(no cast), so a pruned checkpoint holds bit-for-bit copies of the kept weights.

Masks keep the same shapes and zero what is pruned. Scores are ``|W|`` (magnitude) or Wanda's
``|W| * ||x||`` (Sun et al. 2023: the weight times the L2 norm of its input feature over a
calibration set); comparisons are per output row, as Wanda found best, so a row block is pruned
on its own: ``unstructured`` keeps the ``round((1 - sparsity) * in)`` highest-scoring entries of
each row, ``n:m`` keeps the ``n`` highest of every ``m`` consecutive entries of a row (2:4, 4:8).
Ties go to the lower column (stable sort), so results never depend on blocking.

``unit_scores`` is a reduction (statistics only): per row or per column of a weight, the sum of
squares (for an L2 norm) or the sum of Wanda scores. Row sums are per-row partials and column
sums are folded tile by tile in fp64, tiles sitting at fixed row offsets, so the record does not
depend on the memory budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import StatsPass, op


@dataclass(frozen=True)
class GatherParams:
    """Indices (along the gathered axis) of the rows or columns kept, in output order."""

    index: tuple[int, ...]

    def __post_init__(self):
        if any(i < 0 for i in self.index):
            raise ValueError("gather indices must be >= 0")


@op("gather_rows", inputs=("x",), params=GatherParams, compute=False, temps=0)
def gather_rows(ctx, params, x):
    """Output rows start:stop are the input's rows index[start:stop]; read ``x`` whole (WHOLE)."""
    index = torch.tensor(params.index[ctx.start:ctx.stop], dtype=torch.long, device=x.device)
    return x.index_select(0, index)


@op("gather_columns", inputs=("x",), params=GatherParams, compute=False, temps=0)
def gather_columns(ctx, params, x):
    """The columns ``index`` of each row block of ``x`` (read by rows)."""
    index = torch.tensor(params.index, dtype=torch.long, device=x.device)
    return x.index_select(1, index)


@dataclass(frozen=True)
class MaskParams:
    """``pattern`` 'unstructured' (keep 1 - ``sparsity`` of each row) or 'n:m' (keep ``n`` of
    every ``m`` consecutive entries)."""

    pattern: str = "unstructured"
    sparsity: float = 0.5
    n: int = 2
    m: int = 4

    def __post_init__(self):
        if self.pattern not in ("unstructured", "n:m"):
            raise ValueError(f"pattern must be unstructured or n:m, got {self.pattern!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern == "n:m" and not 0 < self.n < self.m:
            raise ValueError(f"n:m needs 0 < n < m, got {self.n}:{self.m}")


def keep_mask(score: torch.Tensor, params: MaskParams) -> torch.Tensor:
    """Boolean mask of the entries kept, per row of ``score`` (rows x in)."""
    rows, cols = score.shape
    if params.pattern == "n:m":
        if cols % params.m:
            raise ValueError(f"{cols} columns do not split into groups of {params.m}")
        groups = score.reshape(rows, cols // params.m, params.m)                 # rows x G x m
        order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, order[..., :params.n], True)
        return keep.reshape(rows, cols)
    kept = cols - int(round(params.sparsity * cols))
    order = torch.sort(score, dim=1, descending=True, stable=True).indices       # rows x in
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep.scatter_(1, order[:, :kept], True)
    return keep


@op("prune_mask", inputs=("x",), params=MaskParams, temps=4)
def prune_mask(ctx, params, x):
    """``x`` with the lowest-|x| entries of each row zeroed (unstructured or n:m)."""
    return torch.where(keep_mask(x.abs(), params), x, torch.zeros_like(x))


@op("prune_mask_wanda", inputs=("x", "norm"), params=MaskParams, temps=5)
def prune_mask_wanda(ctx, params, x, norm):
    """Wanda: ``x`` with the lowest ``|x| * ||input||`` entries of each row zeroed; ``norm`` is the
    per-input-feature activation norm (read whole)."""
    return torch.where(keep_mask(x.abs() * norm.reshape(1, -1), params), x, torch.zeros_like(x))


@dataclass(frozen=True)
class ScoreParams:
    """``axis`` 0 scores rows, 1 scores columns; ``metric`` 'l2' sums squares, 'wanda' sums
    ``|W| * norm`` (``norm`` over the input columns)."""

    axis: int = 0
    metric: str = "l2"

    def __post_init__(self):
        if self.axis not in (0, 1) or self.metric not in ("l2", "wanda"):
            raise ValueError(f"axis must be 0 or 1 and metric l2 or wanda, got {self.axis}, {self.metric!r}")


def _entry_scores(params, w, norm):
    w = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(-1, 1)
    if params.metric == "l2":
        return w.double() ** 2
    return w.abs().double() * norm.double().reshape(1, -1)


def _scores_map(ctx, params, w, norm=None):
    s = _entry_scores(params, w, norm)
    if params.axis == 0:
        return {"rows": [s.sum(dim=1)]}
    return {"cols": s.sum(dim=0)}


def _scores_fold(a, b):
    if "rows" in a:
        return {"rows": a["rows"] + b["rows"]}
    return {"cols": a["cols"] + b["cols"]}


def _scores_reduce(params, partials, ctx):
    total = partials[0]
    for p in partials[1:]:
        total = _scores_fold(total, p)
    if "rows" in total:
        return {"scores": torch.cat(total["rows"]).tolist()}
    return {"scores": total["cols"].tolist()}


_SCORE_PASS = (StatsPass(_scores_map, _scores_reduce, _scores_fold),)


@op("unit_scores", inputs=("w",), params=ScoreParams, temps=3, passes=_SCORE_PASS)
def unit_scores(ctx, params, w):
    """Reduction: per-row / per-column sums of squares of ``w``; the record is ``{"scores": [...]}``."""
    return w


def _wanda_map(ctx, params, w, norm):
    return _scores_map(ctx, params, w, norm)


@op("unit_scores_wanda", inputs=("w", "norm"), params=ScoreParams, temps=3,
    passes=(StatsPass(_wanda_map, _scores_reduce, _scores_fold),))
def unit_scores_wanda(ctx, params, w, norm):
    """Reduction: per-row / per-column sums of ``|w| * norm`` (Wanda); ``norm`` read whole."""
    return w
