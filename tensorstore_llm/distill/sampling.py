"""Sparse teacher targets: random-sampling KD (RS-KD), top-k, full log-probs.

RS-KD (Anshumann et al., "Sparse Logit Sampling", arXiv 2503.16870): per position, the teacher
distribution t = softmax(logits / T) is computed in fp32 and N ids are drawn with replacement from
a proposal q ∝ t^τ. For τ = 1 (q = t) the target is t̂_i = c_i / N over the unique drawn ids with
counts c_i: it sums to 1 and E[t̂] = t exactly, so the expected gradient of a cross-entropy against
t̂ equals that of full KD. For τ ≠ 1 the importance weights t̂_i = (c_i / N) · t_i / q_i are
unbiased (E[t̂] = t) but do not sum to 1; with ``self_normalise=True`` they are divided by their
sum (biased, lower variance). Top-k (DistillKit style: k ids + their log-probs) is biased and kept
as a baseline.

Draws are inverse-CDF lookups of uniforms from ``seeding.uniform_rows(seed, "rs-kd",
"sequence/<index>", (seq_len, N), start, stop)``: the ids of a position depend only on the run
seed, the sequence's global index and the teacher's probabilities, never on batch or chunk size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..seeding import uniform_rows

SAMPLING_STREAM = "rs-kd"


def teacher_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) in fp32 over the last axis."""
    return torch.softmax(logits.float() / float(temperature), dim=-1)


def sequence_uniforms(seed: int, sequence: int, seq_len: int, draws: int, start: int, stop: int,
                      teacher: int = 0) -> torch.Tensor:
    """Uniforms [stop - start, draws] in [0, 1) for positions start:stop of one sequence.

    Teacher j > 0 of a several-teacher dataset draws from its own stream
    (``teacher/<j>/sequence/<index>``); teacher 0 uses the single-teacher stream.
    """
    name = f"sequence/{int(sequence)}" if teacher == 0 else f"teacher/{int(teacher)}/sequence/{int(sequence)}"
    return uniform_rows(seed, SAMPLING_STREAM, name, (seq_len, draws), start, stop)


CDF_BLOCK = 256


def proportional_probs_(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """exp(logits / T - max) in place (fp32): proportional to softmax(logits / T), not normalised.

    Saves the softmax's division and its second [P, V] tensor; the draws below normalise by the
    row totals they accumulate anyway. ``logits`` is overwritten (a float32 copy is made first
    when it is not float32).
    """
    x = logits if logits.dtype == torch.float32 else logits.float()
    if temperature != 1.0:
        x.div_(float(temperature))
    return x.sub_(x.amax(dim=-1, keepdim=True)).exp_()


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draws: (int64 ids [P, N], float64 row totals [P]) with P(id = i) = probs[p, i] / total[p].

    ``probs`` [P, V] is non-negative and need not be normalised. Two-level CDF: the vocabulary
    is cut into blocks of ``CDF_BLOCK`` ids; the block masses (float32 sums of 256 terms) are
    accumulated in float64, a draw first finds its block there, then its id by the float32
    cumulative sum of that one block, computed for the drawn blocks only ([P, N, 256] instead of a
    cumsum over [P, V]: 3x cheaper at a 49k vocabulary). Sums of 256 terms keep float32's
    relative precision, so tail ids keep their probability at a 128k vocab. An id with zero
    probability is never drawn (searchsorted with right=True skips flat steps, and the residual
    is kept strictly below its block's cumulative sum).
    """
    P, V = probs.shape
    B = CDF_BLOCK
    pad = (-V) % B
    p = probs.float()
    blocks = (torch.nn.functional.pad(p, (0, pad)) if pad else p).view(P, -1, B)   # [P, nb, B]
    prefix = torch.cumsum(blocks.sum(dim=-1).double(), dim=-1)         # [P, nb] float64 block CDF
    total = prefix[:, -1]                                              # [P]
    targets = uniforms.double() * total.unsqueeze(1)                   # [P, N], strictly below the total
    block = torch.searchsorted(prefix, targets, right=True).clamp_(max=prefix.shape[1] - 1)   # [P, N]
    before = torch.where(block > 0, torch.gather(prefix, 1, (block - 1).clamp_(min=0)), torch.zeros_like(targets))
    rows = torch.arange(P, device=probs.device).unsqueeze(1).expand_as(block)
    inner = torch.cumsum(blocks[rows, block], dim=-1)                  # [P, N, B] float32, drawn blocks only
    block_mass = inner[..., -1]                                        # [P, N]
    residual = torch.minimum((targets - before).float(), torch.nextafter(block_mass, torch.zeros_like(block_mass)))
    within = torch.searchsorted(inner, residual.unsqueeze(-1), right=True).squeeze(-1)   # [P, N]
    return (block * B + within.clamp_(max=B - 1)).clamp_(max=V - 1), total


def draw_ids(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: int64 ids [P, N] with P(id = i) = probs[p, i] / sum(probs[p]) (see ``inverse_cdf``)."""
    return inverse_cdf(probs, uniforms)[0]


@dataclass
class SparseRows:
    """CSR sparse targets for P positions: row r holds ``ids[offsets[r]:offsets[r+1]]``.

    ``ids`` are ascending within a row. ``counts`` (int) are set for RS-KD; ``weights`` (float32)
    for τ ≠ 1 (importance weights) and ``logprobs`` (float32) for top-k.
    """

    offsets: np.ndarray                 # int64 [P + 1]
    ids: np.ndarray                     # int32 [nnz]
    counts: np.ndarray | None = None    # uint8/uint16 [nnz]
    weights: np.ndarray | None = None   # float32 [nnz]
    logprobs: np.ndarray | None = None  # float32 [nnz]
    coverage: np.ndarray | None = None  # float32 [P]: teacher mass on the stored ids

    @property
    def positions(self) -> int:
        return len(self.offsets) - 1


def unique_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unique ids per row of ``draws`` [P, N] with their counts, on the draws' device.

    Returns (per_row [P], rows [nnz], ids [nnz], counts [nnz]): a new (row, id) starts wherever
    the sorted id changes.
    """
    P, N = draws.shape
    s, _ = torch.sort(draws, dim=-1)                                  # [P, N]
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    starts = torch.nonzero(new.reshape(-1)).squeeze(1)                # [nnz] flat index of each first draw
    ids = s.reshape(-1)[starts]
    ends = torch.cat([starts[1:], starts.new_tensor([P * N])])
    return new.sum(dim=1), torch.div(starts, N, rounding_mode="floor"), ids, ends - starts


def rs_kd_tensors(probs: torch.Tensor, uniforms: torch.Tensor, *, tau: float = 1.0,
                  self_normalise: bool = False) -> dict:
    """RS-KD targets as tensors on ``probs``' device, ready for :func:`rows_from_tensors`.

    Same arguments as :func:`rs_kd`. Returns {"per_row": int64 [P] stored ids per position,
    "ids": int32 [nnz], "counts": uint8 [nnz] (int32 when N > 255), "coverage": float32 [P],
    "weights": float32 [nnz] for τ ≠ 1 else None}: all the device work, nothing copied back.
    """
    P, N = uniforms.shape
    q = probs if tau == 1.0 else probs.clamp_min(0).pow(tau)
    draws, q_total = inverse_cdf(q, uniforms.to(probs.device))
    per_row, rows, ids, counts = unique_counts(draws)
    t_total = q_total if tau == 1.0 else probs.sum(dim=-1, dtype=torch.float64)
    t_sel = probs[rows, ids].double() / t_total[rows]                              # [nnz] normalised t
    coverage = torch.zeros(P, dtype=torch.float64, device=probs.device).index_add_(0, rows, t_sel)
    out = {"per_row": per_row, "ids": ids.to(torch.int32), "counts": counts.to(torch.uint8 if N < 256 else torch.int32),
           "coverage": coverage.float(), "weights": None}
    if tau != 1.0:
        q_sel = q[rows, ids].double() / q_total[rows]
        w = (counts.double() / N) * (t_sel / q_sel)
        if self_normalise:
            total = torch.zeros(P, dtype=torch.float64, device=probs.device).index_add_(0, rows, w)
            w = w / total[rows]
        out["weights"] = w.float()
    return out


def rows_from_tensors(tensors: dict, draws: int | None = None) -> SparseRows:
    """:class:`SparseRows` from the tensors of :func:`rs_kd_tensors` / :func:`top_k_tensors` /
    :func:`full_tensors` (host tensors, or device tensors copied here); ``draws`` (N) sets the
    count dtype, uint8 below 256 draws and uint16 from there."""
    def host(name):
        t = tensors.get(name)
        return None if t is None else t.cpu().numpy()
    per_row = host("per_row")
    offsets = np.zeros(len(per_row) + 1, dtype=np.int64)
    np.cumsum(per_row, out=offsets[1:])
    counts = host("counts")
    if counts is not None:
        counts = counts.astype(np.uint8 if draws is not None and draws < 256 else np.uint16)
    return SparseRows(offsets, host("ids").astype(np.int32, copy=False), counts, host("weights"), host("logprobs"),
                      host("coverage"))


def rs_kd(probs: torch.Tensor, uniforms: torch.Tensor, *, tau: float = 1.0, self_normalise: bool = False) -> SparseRows:
    """RS-KD targets for positions whose teacher distribution t is proportional to ``probs`` [P, V].

    ``probs`` is fp32 and non-negative; rows need not sum to 1 (``proportional_probs_`` output
    is fine: t = probs / row sum). Runs on ``probs``' device (uniforms are moved there); only the
    sparse result is copied back (``rs_kd_tensors`` + ``rows_from_tensors``; the precompute
    copies asynchronously in between, ``host_copy.HostCopy``).

    Args:
        probs: teacher distribution t per position, up to a positive factor per row.
        uniforms: [P, N] uniforms in [0, 1) (``sequence_uniforms``); N is the number of draws.
        tau: proposal exponent, q ∝ t^τ. τ = 1 stores integer counts only.
        self_normalise: for τ ≠ 1, divide the importance weights of a row by their sum.
    Returns:
        :class:`SparseRows` with counts (always), weights (τ ≠ 1) and coverage Σ t over stored ids.

    Example:
        >>> t = torch.tensor([[0.5, 0.25, 0.25]])
        >>> rows = rs_kd(t, torch.rand(1, 50))
        >>> int(rows.counts.sum())
        50
    """
    return rows_from_tensors(rs_kd_tensors(probs, uniforms, tau=tau, self_normalise=self_normalise), uniforms.shape[1])


def split_rows(rows: SparseRows, parts: int) -> list[SparseRows]:
    """Cut the positions of ``rows`` into ``parts`` equal consecutive runs (e.g. one per sequence)."""
    per = rows.positions // parts
    out = []
    for j in range(parts):
        a, b = rows.offsets[j * per], rows.offsets[(j + 1) * per]
        pairs = [None if x is None else x[a:b] for x in (rows.ids, rows.counts, rows.weights, rows.logprobs)]
        out.append(SparseRows(rows.offsets[j * per:(j + 1) * per + 1] - a, *pairs,
                              coverage=None if rows.coverage is None else rows.coverage[j * per:(j + 1) * per]))
    return out


def top_k_tensors(probs: torch.Tensor, k: int) -> dict:
    """Top-k targets as tensors on ``probs``' device (see :func:`top_k`; for :func:`rows_from_tensors`)."""
    P, V = probs.shape
    k = min(int(k), V)
    values, ids = torch.topk(probs, k, dim=-1)
    ids, order = torch.sort(ids, dim=-1)
    values = torch.gather(values, 1, order)
    return {"per_row": torch.full((P,), k, dtype=torch.int64, device=probs.device),
            "ids": ids.reshape(-1).to(torch.int32), "logprobs": torch.log(values.clamp_min(1e-30)).reshape(-1),
            "coverage": values.sum(dim=-1)}


def top_k(probs: torch.Tensor, k: int) -> SparseRows:
    """The k most probable ids per position (ascending id order) and their log-probs (fp32)."""
    return rows_from_tensors(top_k_tensors(probs, k))


def full_tensors(probs: torch.Tensor) -> dict:
    """Every id with its log-prob, as tensors on ``probs``' device (see :func:`full`)."""
    P, V = probs.shape
    return {"per_row": torch.full((P,), V, dtype=torch.int64, device=probs.device),
            "ids": torch.arange(V, dtype=torch.int32, device=probs.device).repeat(P),
            "logprobs": torch.log(probs.clamp_min(1e-30)).reshape(-1), "coverage": probs.sum(dim=-1)}


def full(probs: torch.Tensor) -> SparseRows:
    """Every id with its log-prob: the dense reference, for tiny tests only."""
    return rows_from_tensors(full_tensors(probs))


def dense_targets(rows: SparseRows, vocab: int, draws: int | None = None) -> torch.Tensor:
    """The sparse targets as a dense [P, vocab] float64 tensor (for tests and references).

    RS-KD rows: weights if present, else counts / draws. Top-k / full rows: exp(logprobs).
    """
    P = rows.positions
    out = torch.zeros(P, vocab, dtype=torch.float64)
    r = torch.from_numpy(np.repeat(np.arange(P), np.diff(rows.offsets)))
    ids = torch.from_numpy(rows.ids.astype(np.int64))
    if rows.weights is not None:
        values = torch.from_numpy(rows.weights).double()
    elif rows.counts is not None:
        values = torch.from_numpy(rows.counts.astype(np.float64)) / float(draws)
    else:
        values = torch.from_numpy(rows.logprobs).double().exp()
    out[r, ids] = values
    return out
