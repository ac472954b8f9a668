"""Cross-tokenizer alignment and the teacher-guided token selection of VocAgnoLM.

VocAgnoLM (arXiv 2503.19123) trains a student with its own tokenizer from a teacher's per-token
losses. Each student token (character span [a, b)) maps to the span of teacher tokens overlapping
it, found by two binary searches over the teacher's offsets (O(N log M) for N student and M
teacher tokens, one ``searchsorted`` each over the whole sequence):

- first = the first teacher token whose end is after a  (searchsorted(ends, a, 'right'));
- last  = the last teacher token whose start is before b (searchsorted(starts, b, 'left') - 1).

A student token is *unmapped* when first > last (no teacher token overlaps it: a zero-width
student token, or text the teacher never saw). The teacher NLL is aggregated over the span (max
by default, as in the paper; sum or mean), the score is student loss − teacher loss, and the
top-k% of scores (40% by default) plus every unmapped token are trained on.

Teacher offsets must be non-decreasing; byte-level tokenizers can give overlapping offsets
for one multi-byte character, so starts and ends are made monotone with a running maximum.
"""
from __future__ import annotations

import math

import numpy as np
import torch

AGGREGATIONS = ("max", "sum", "mean")


def align_spans(student_offsets: np.ndarray, teacher_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, last) teacher token index per student token; unmapped where first > last.

    Args:
        student_offsets: int [N, 2] character [start, end) of each student token.
        teacher_offsets: int [M, 2] of each teacher token, in text order.
    Returns:
        Two int64 arrays [N].

    Example:
        >>> first, last = align_spans(np.array([[0, 5]]), np.array([[0, 2], [2, 5], [5, 7]]))
        >>> first.tolist(), last.tolist()
        ([0], [1])
    """
    s = np.asarray(student_offsets, dtype=np.int64).reshape(-1, 2)
    t = np.asarray(teacher_offsets, dtype=np.int64).reshape(-1, 2)
    starts = np.maximum.accumulate(t[:, 0]) if len(t) else t[:, 0]
    ends = np.maximum.accumulate(t[:, 1]) if len(t) else t[:, 1]
    first = np.searchsorted(ends, s[:, 0], side="right")
    last = np.searchsorted(starts, s[:, 1], side="left") - 1
    empty = s[:, 1] <= s[:, 0]
    first[empty], last[empty] = 1, 0
    return first, last


def aggregate_span(values: np.ndarray, first: np.ndarray, last: np.ndarray, how: str = "max") -> np.ndarray:
    """Aggregate ``values`` [M] over each span [first, last] by max, sum or mean; NaN when unmapped.

    NaN values (e.g. the teacher's first token, which has no NLL) are skipped; a span of only NaN
    gives NaN.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"how must be one of {AGGREGATIONS}, got {how!r}")
    v = np.asarray(values, dtype=np.float64)
    mapped = first <= last
    out = np.full(len(first), np.nan)
    if not mapped.any() or len(v) == 0:
        return out
    lo, hi = first[mapped], last[mapped]          # each mapped span [lo, hi]
    finite = ~np.isnan(v)
    n = np.concatenate([[0], np.cumsum(finite)])
    counts = n[hi + 1] - n[lo]
    if how == "max":
        padded = np.concatenate([np.where(finite, v, -np.inf), [-np.inf]])
        pairs = np.stack([lo, hi + 1], axis=1).reshape(-1)                  # reduceat over [lo, hi + 1)
        agg = np.maximum.reduceat(padded, pairs)[::2]
    else:
        c = np.concatenate([[0.0], np.cumsum(np.where(finite, v, 0.0))])
        agg = c[hi + 1] - c[lo]
        if how == "mean":
            agg = agg / np.maximum(counts, 1)
    out[mapped] = np.where(counts > 0, agg, np.nan)
    return out


def select_tokens(student_loss: torch.Tensor, teacher_loss: torch.Tensor, *, fraction: float = 0.4) -> torch.Tensor:
    """Bool mask of the tokens to train on: top-``fraction`` scores plus every unmapped token.

    Args:
        student_loss: [n] per-token student NLL.
        teacher_loss: [n] aggregated teacher NLL per student token, NaN where unmapped.
        fraction: share of the mapped tokens kept, ranked by score = student − teacher
            (ceil(fraction · mapped), ties broken by position).
    """
    unmapped = torch.isnan(teacher_loss)
    score = (student_loss.detach() - teacher_loss).masked_fill(unmapped, float("-inf"))
    mapped = int((~unmapped).sum())
    keep = min(mapped, math.ceil(fraction * mapped))
    chosen = torch.zeros_like(unmapped)
    if keep:
        chosen[torch.topk(score, keep, sorted=False).indices] = True
    return chosen | unmapped


def teacher_guided_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_loss: torch.Tensor, *,
                        fraction: float = 0.4) -> torch.Tensor:
    """VocAgnoLM loss: mean student NLL over the selected tokens of a batch.

    Args:
        student_logits: [B, L, V]; labels: [B, L] (unshifted, HF style).
        teacher_loss: [B, L] aggregated teacher NLL of each *label* token (index p + 1 predicts from
            logits p, so teacher_loss[:, 0] is unused), NaN where unmapped.
        fraction: top share of mapped tokens kept (0.4 in the paper).
    """
    logits = student_logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                            reduction="none")
    chosen = select_tokens(nll, teacher_loss[:, 1:].reshape(-1).to(nll.dtype), fraction=fraction)
    return (nll * chosen).sum() / chosen.sum().clamp_min(1)


def student_span_teacher_nll(student_offsets: np.ndarray, teacher_offsets: np.ndarray, teacher_nll: np.ndarray,
                             how: str = "max") -> np.ndarray:
    """Aggregated teacher NLL per student token (NaN where unmapped): align, then aggregate."""
    first, last = align_spans(student_offsets, teacher_offsets)
    return aggregate_span(teacher_nll, first, last, how)


def student_offsets(tokenizer, text: str) -> tuple[list[int], np.ndarray]:
    """(ids, int [n, 2] character offsets) of ``text`` under a student tokenizer, no special tokens.

    Accepts a transformers fast tokenizer or a ``tokenizers.Tokenizer``.
    """
    if hasattr(tokenizer, "backend_tokenizer"):                       # transformers fast tokenizer
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    enc = tokenizer.encode(text, add_special_tokens=False)
    return list(enc.ids), np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)


def align_sequence(seq, tokenizer, *, how: str = "max") -> dict:
    """A cached teacher sequence re-tokenised for a student with another tokenizer.

    Args:
        seq: a decoded ``SequenceTargets`` from a dataset precomputed with ``alignment=True``
            (text, teacher character offsets and per-token NLL).
        tokenizer: the student's tokenizer (transformers fast tokenizer or ``tokenizers.Tokenizer``).
        how: aggregation of the teacher NLL over each student token's span ('max', 'sum', 'mean').
    Returns:
        {"input_ids": int64 [n], "labels": int64 [n], "teacher_loss": float32 [n] (NaN where
        unmapped)}, ready for :func:`teacher_guided_loss` after padding / stacking.
    """
    if seq.text is None or seq.nll is None or seq.char_offsets is None:
        raise ValueError("the dataset has no alignment data: precompute it with alignment=True (--alignment)")
    ids, offsets = student_offsets(tokenizer, seq.text)
    loss = student_span_teacher_nll(offsets, seq.char_offsets, seq.nll, how)
    input_ids = torch.tensor(ids, dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone(),
            "teacher_loss": torch.from_numpy(loss.astype(np.float32))}
