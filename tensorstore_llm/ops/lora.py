"""Pure LoRA kernels: merge, DoRA, combine, re-factor, extract, PiSSA / GOAT initialisation.

LoRA (Hu et al. 2021) adds a low-rank update to a frozen weight: W = W0 + s * B @ A with
B: out x r, A: r x in and s = alpha / r (rsLoRA, Kalajdzievski 2023: alpha / sqrt(r)). DoRA
(Liu et al. 2024) rescales the merged weight by a learned magnitude per output feature:
W = m * (W0 + s B A) / ||W0 + s B A||, the norm taken over the input dimension per output row
(PEFT's ``DoraLinearLayer.get_weight_norm``). Everything here is a pure function of tensors: no
files, no devices (kernels never call ``.to(device)``), fp32 arithmetic unless stated, one
rounding to the output dtype at the end.

Layouts. ``transpose=False``: the base weight is stored out x in (``nn.Linear``) and the delta is
``B @ A``. ``transpose=True``: the base is stored in x out (GPT-2 ``Conv1D`` with PEFT's
``fan_in_fan_out``, and ``nn.Embedding`` whose LoRA factors are ``lora_embedding_A``: r x vocab,
``lora_embedding_B``: dim x r) and the delta is ``(B @ A).T``. Row ranges always refer to rows of
the *stored* base weight, so a streamed merge can hand over W[r0:r1] with the matching slice of the
factors.

Wiring into the engine (not done here): a merge job per target weight reads W in row blocks and
A, B (and DoRA's magnitude) as whole-tensor side inputs, and computes
``lora.merge.merge_module_rows`` per block; DoRA on a transposed layout first needs the column
norms of the whole W + delta (``dora_norm``; a whole-tensor input, since partial sums of squares
would not round like PEFT's ``torch.linalg.norm``). Extraction and PiSSA / GOAT need the whole
tensor (an SVD) and have several outputs (A, B, residual). Combine and resize read only the
factors. NF4 round trips work on 64-element blocks of the flattened tensor, but double
quantisation's offset is the mean of all block absmaxes of the tensor, so it needs a reduction
pass (or the whole tensor) first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# the extraction moved to ops/lora_extract.py; re-exported here
from .. import dtypes
from .lora_extract import ExtractedLora, extract_lora, randomized_svd
from .registry import op

__all__ = ["ExtractedLora", "Refactored", "SvdInit", "concat_factors", "dora_merge_rows", "dora_norm", "extract_lora",
           "goat_init", "lora_delta", "lora_scaling", "merge_rows", "pissa_init", "product_svd", "randomized_svd",
           "rank_budget", "refactor"]


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The LoRA scale s: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA (as PEFT computes it).

    >>> lora_scaling(16, 4), lora_scaling(16, 4, use_rslora=True)
    (4.0, 8.0)
    """
    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, *, transpose: bool = False,
               rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Rows ``rows`` of the LoRA update in the base weight's stored layout, in fp32.

    Computes ``(B @ A) * scaling`` (``transpose=False``) or ``(B @ A).T * scaling`` exactly as PEFT's
    ``get_delta_weight`` does (product first, then the scale), so adding it to an fp32 base gives
    PEFT's merge bit for bit.

    Args:
        A: r x in (``lora_A``) or r x vocab (``lora_embedding_A``).
        B: out x r (``lora_B``) or dim x r (``lora_embedding_B``).
        scaling: s from :func:`lora_scaling` (times any user scale).
        transpose: base stored in x out (fan_in_fan_out Conv1D, embeddings).
        rows: (r0, r1) of the stored layout; None for all rows.
    Returns:
        fp32 tensor, (r1 - r0) x columns of the stored weight.

    >>> A, B = torch.ones(2, 3), torch.ones(4, 2)
    >>> lora_delta(A, B, 0.5, rows=(1, 3)).shape
    torch.Size([2, 3])
    """
    A32, B32 = A.float(), B.float()
    if not transpose:
        if rows is not None:
            B32 = B32[rows[0]:rows[1]]
        return (B32 @ A32).mul_(scaling)                   # (r1-r0) x in; scaled in place, as * would round
    if rows is not None:
        A32 = A32[:, rows[0]:rows[1]]
    return (B32 @ A32).mul_(scaling).T                      # (r1-r0) x out


def merge_rows(w_rows: torch.Tensor, delta_rows: torch.Tensor, *, out_dtype: torch.dtype | None = None,
               round_delta_to: torch.dtype | None = None) -> torch.Tensor:
    """W[r0:r1] + delta[r0:r1] in fp32, rounded once to ``out_dtype`` (default: W's dtype).

    ``round_delta_to`` reproduces PEFT where it rounds twice: PEFT casts the delta to the
    adapter's dtype when the adapter is fp16/bf16, and an embedding's delta to the base dtype,
    before adding. Leave it None for the single-rounding merge.

    >>> merge_rows(torch.zeros(2, 2, dtype=torch.bfloat16), torch.ones(2, 2)).dtype
    torch.bfloat16
    """
    delta = delta_rows.float()
    if round_delta_to is not None:
        delta = delta.to(round_delta_to).float()
    return (w_rows.float() + delta).to(out_dtype or w_rows.dtype)


def dora_norm(w: torch.Tensor, delta: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """DoRA's weight norm ||W + delta|| per output feature, in fp32, as PEFT computes it.

    For ``transpose=False`` (nn.Linear) the norm of each stored row over the input dimension, so
    any row block of W and delta gives the norms of its own rows. For ``transpose=True``
    (Conv1D fan_in_fan_out, embeddings) the norm of each stored column, which needs all rows.

    Args:
        w: base weight (or a row block of it), stored layout.
        delta: fp32 delta from :func:`lora_delta` for the same rows.
    Returns:
        fp32 vector: one norm per stored row (``transpose=False``) or per column.
    """
    merged = w.float() + delta if not transpose else w.float().T + delta.T
    return torch.linalg.norm(merged, dim=1)


def dora_merge_rows(w_rows: torch.Tensor, delta_rows: torch.Tensor, magnitude: torch.Tensor,
                    norm: torch.Tensor, *, transpose: bool = False,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """DoRA merge of a row block: (m / ||W + delta||) * (W + delta), fp32, one rounding.

    Args:
        w_rows, delta_rows: rows r0:r1 of the stored base weight and of :func:`lora_delta`.
        magnitude: ``lora_magnitude_vector``; its rows r0:r1 when ``transpose=False``, all of it
            (one entry per stored column) when ``transpose=True``.
        norm: :func:`dora_norm` over the same rows (``transpose=False``) or over the whole
            weight (``transpose=True``).
    Returns:
        the merged rows in ``out_dtype`` (default: W's dtype); equals PEFT's DoRA
        ``merge_and_unload`` for fp32 inputs.
    """
    factor = magnitude.float() / norm
    factor = factor.view(-1, 1) if not transpose else factor.view(1, -1)
    return (factor * (w_rows.float() + delta_rows)).to(out_dtype or w_rows.dtype)


def concat_factors(factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact linear combination of LoRAs as one LoRA of rank sum(r_i).

    sum_i w_i s_i B_i A_i = [w_1 s_1 B_1, ..., w_k s_k B_k] @ [A_1; ...; A_k], so the combined
    update has no cross terms B_i A_j (which averaging A and B separately would create).

    Args:
        factors: (A_i, B_i, c_i) with c_i = weight_i * scaling_i.
    Returns:
        (A, B) in fp32, A: R x in, B: out x R with R = sum r_i, and B @ A the combined delta.
    """
    A = torch.cat([a.float() for a, _, _ in factors], dim=0)          # R x in
    B = torch.cat([b.float() * c for _, b, c in factors], dim=1)     # out x R
    return A, B


@dataclass
class Refactored:
    """Result of :func:`refactor`: rank-``rank`` factors with B @ A the best approximation.

    ``singular_values`` are those of the full product (all R of them); ``tail_energy`` is the
    squared Frobenius error sum_{i>rank} sigma_i^2 (Eckart-Young), ``total_energy`` = ||B A||_F^2.
    """

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    singular_values: torch.Tensor
    tail_energy: float
    total_energy: float

    @property
    def relative_error(self) -> float:
        """||BA - B_r A_r||_F / ||BA||_F (0 for a zero update)."""
        return math.sqrt(self.tail_energy / self.total_energy) if self.total_energy > 0 else 0.0


def product_svd(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype = torch.float32):
    """SVD of B @ A (m x R times R x n) through QR of the factors: O((m + n) R^2).

    B = Qb Rb, A^T = Qa Ra, so B A = Qb (Rb Ra^T) Qa^T and the SVD of the R x R core gives the
    singular triplets; no m x n matrix is formed.

    Returns:
        (U: m x R, S: R descending, Vh: R x n) in ``dtype``.
    """
    Qb, Rb = torch.linalg.qr(B.to(dtype))                           # m x R, R x R
    Qa, Ra = torch.linalg.qr(A.to(dtype).T.contiguous())            # n x R, R x R
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)                          # R x R core
    return Qb @ U, S, Vh @ Qa.T                                     # m x R, R, R x n


def _rank_for_energy(S: torch.Tensor, energy: float) -> int:
    e = S.double() ** 2
    total = float(e.sum())
    if total == 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1


def refactor(A: torch.Tensor, B: torch.Tensor, rank: int | None = None, energy: float | None = None, *,
             svd=None, dtype: torch.dtype = torch.float32) -> Refactored:
    """Truncate the product B @ A to its best rank-``rank`` approximation (or the smallest rank
    keeping ``energy`` of ||BA||_F^2), without forming the out x in matrix.

    Used to re-factor combined LoRAs and to resize (DyLoRA-style) an adapter. The returned
    factors split the singular values evenly: B_r = U_r sqrt(S_r), A_r = sqrt(S_r) V_r^T, fp32.

    Args:
        A: R x in, B: out x R (scale already folded in, so the update is B @ A).
        rank: target rank (<= R), or
        energy: fraction in (0, 1] of the squared Frobenius norm to keep.
        svd: (U, S, Vh) from :func:`product_svd` when already computed.
        dtype: precision of the QR / SVD (float64 for very ill-conditioned factors).
    Returns:
        :class:`Refactored`; ``relative_error`` is the Eckart-Young error of the truncation.

    >>> A, B = torch.randn(6, 10), torch.randn(8, 6)
    >>> out = refactor(A, B, rank=6)
    >>> bool(torch.allclose(out.B @ out.A, B @ A, atol=1e-4))
    True
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    U, S, Vh = svd if svd is not None else product_svd(A, B, dtype)
    if energy is not None:
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        rank = _rank_for_energy(S, energy)
    if not 1 <= rank <= S.numel():
        raise ValueError(f"rank must be in [1, {S.numel()}], got {rank}")
    root = S[:rank].sqrt()
    e = S.double() ** 2
    return Refactored(
        A=(root[:, None] * Vh[:rank]).float(), B=(U[:, :rank] * root[None, :]).float(), rank=rank,
        singular_values=S.float(), tail_energy=float(e[rank:].sum()), total_energy=float(e.sum()))


def rank_budget(spectra: dict[str, tuple[torch.Tensor, int]], budget: int, min_rank: int = 1) -> dict[str, int]:
    """Per-module ranks under a total parameter budget (``--rank-pattern auto``).

    Greedy on energy per parameter: every module starts at ``min_rank``; the next singular
    direction kept is the one with the largest sigma^2 / (out + in) over all modules, until the
    parameters sum(rank_i * (out_i + in_i)) would exceed ``budget``. Because each module's
    sigma are sorted, the greedy choice is optimal for this separable knapsack up to the last item.

    Args:
        spectra: module -> (singular values sorted descending, out + in).
        budget: total LoRA parameters allowed.
    Returns:
        module -> rank.
    """
    import heapq

    ranks = {k: min(min_rank, s.numel()) for k, (s, _) in spectra.items()}
    used = sum(ranks[k] * cost for k, (_, cost) in spectra.items())
    if used > budget:
        raise ValueError(f"budget {budget} is below the minimum {used} (rank {min_rank} everywhere)")
    heap = [(-float(s[ranks[k]]) ** 2 / cost, k) for k, (s, cost) in spectra.items() if ranks[k] < s.numel()]
    heapq.heapify(heap)
    while heap:
        _, k = heapq.heappop(heap)
        s, cost = spectra[k]
        if used + cost > budget:
            continue
        used += cost
        ranks[k] += 1
        if ranks[k] < s.numel():
            heapq.heappush(heap, (-float(s[ranks[k]]) ** 2 / cost, k))
    return ranks


@dataclass
class SvdInit:
    """SVD-structured initialisation: adapters (A_e, B_e) and the residual base (fp32) with
    residual + sum_e s * B_e @ A_e == W0 up to fp32 rounding."""

    adapters: list[tuple[torch.Tensor, torch.Tensor]]
    residual: torch.Tensor


def _svd_init(W: torch.Tensor, segments: list[tuple[int, int]], scaling: float) -> SvdInit:
    W32 = W.float()
    U, S, Vh = torch.linalg.svd(W32, full_matrices=False)
    adapters, residual = [], W32.clone()
    for lo, hi in segments:
        root = (S[lo:hi] / scaling).sqrt()
        A = root[:, None] * Vh[lo:hi]                       # r x in
        B = U[:, lo:hi] * root[None, :]                     # out x r
        adapters.append((A, B))
        residual = residual - lora_delta(A, B, scaling)
    return SvdInit(adapters=adapters, residual=residual)


def pissa_init(W: torch.Tensor, rank: int, scaling: float = 1.0) -> SvdInit:
    """PiSSA (Meng et al. 2024): the adapter holds the top-``rank`` singular triplets of W0 and
    the base becomes the residual W0 - s B A.

    A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), so s B A = U_r S_r V_r^T. Exact SVD in fp32.

    >>> W = torch.randn(6, 5)
    >>> init = pissa_init(W, 2, scaling=2.0)
    >>> A, B = init.adapters[0]
    >>> bool(torch.allclose(init.residual + lora_delta(A, B, 2.0), W, atol=1e-5))
    True
    """
    if not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank must be in [1, {min(W.shape)}], got {rank}")
    return _svd_init(W, [(0, rank)], scaling)


def goat_init(W: torch.Tensor, rank: int, n_experts: int, scaling: float = 1.0) -> SvdInit:
    """GOAT-style (Fan et al. 2025) initialisation of a LoRA mixture of experts from different
    SVD segments of W0: the k = min(out, in) singular directions are split into ``n_experts``
    contiguous segments and expert e takes the first ``rank`` directions of segment e, so the
    experts see the head, the middle and the tail of the spectrum. The residual removes all of
    them, so residual + sum of experts == W0.
    """
    k = min(W.shape)
    if n_experts < 1 or rank < 1 or rank * n_experts > k:
        raise ValueError(f"need 1 <= rank * n_experts <= {k}, got rank {rank} x {n_experts} experts")
    starts = [e * k // n_experts for e in range(n_experts)]     # segments of >= k // n_experts >= rank
    return _svd_init(W, [(s, s + rank) for s in starts], scaling)


# -- streamed merge ops: what `tsllm lora merge` runs per tensor, block by block -------------------

@dataclass(frozen=True)
class LoraMergeParams:
    """A module's LoRA scale s (times any user scale) and the base weight's layout."""

    scaling: float
    transpose: bool = False        # base stored in x out (fan_in_fan_out Conv1D, embeddings)
    # PEFT's nn.Embedding merge: W (a base layer saved with the adapter is loaded into the model's
    # dtype) and the delta (``get_delta_weight(...).to(orig_dtype)``) are each rounded to the base's
    # dtype before the sum. None: one rounding of W + s·B·A (PEFT's nn.Linear merge).
    round_to: str | None = None

    def __post_init__(self):
        if not math.isfinite(self.scaling):
            raise ValueError(f"LoRA scaling must be a finite number, got {self.scaling!r}")


@op("lora_merge", inputs=("w", "a", "b"), params=LoraMergeParams, temps=2)
def lora_merge_op(ctx, params, w, a, b):
    """Rows of W + s·B·A (or its transpose) in fp32; the executor rounds once to the output dtype.
    W arrives by rows, A and B whole. The tile's delta is the only temporary: W is added into it
    (d + w == w + d bit for bit). With ``round_to`` (embeddings), W and the delta are first rounded
    to that dtype, as PEFT's embedding merge does."""
    delta = lora_delta(a, b, params.scaling, transpose=params.transpose, rows=(ctx.start, ctx.stop))
    if params.round_to is not None:
        half = dtypes.by_name(params.round_to).torch
        return delta.to(half).float().add_(w.to(half))
    return delta.add_(w)


@op("dora_merge", inputs=("w", "a", "b", "magnitude"), params=LoraMergeParams, temps=4)
def dora_merge_op(ctx, params, w, a, b, magnitude):
    """Rows of DoRA's m·(W + s·B·A)/‖W + s·B·A‖ for an ``nn.Linear`` layout, whose norm is per
    stored row (PEFT's convention), so row blocks are exact."""
    delta = lora_delta(a, b, params.scaling, rows=(ctx.start, ctx.stop))
    return dora_merge_rows(w, delta, magnitude[ctx.start:ctx.stop], dora_norm(w, delta), out_dtype=torch.float32)


@op("dora_merge_transposed", inputs=("w", "a", "b", "magnitude"), params=LoraMergeParams, rowwise=False, temps=4)
def dora_merge_transposed_op(ctx, params, w, a, b, magnitude):
    """DoRA on a transposed layout (Conv1D, embeddings): its norm runs over stored columns, so the
    whole tensor is computed at once."""
    delta = lora_delta(a, b, params.scaling, transpose=True)
    return dora_merge_rows(w, delta, magnitude, dora_norm(w, delta, transpose=True), transpose=True,
                           out_dtype=torch.float32)


@op("lora_bias_merge", inputs=("w", "bias"), params=LoraMergeParams, temps=2)
def lora_bias_merge_op(ctx, params, w, bias):
    """A bias plus s times its ``lora_bias`` (PEFT's ``lora_bias=True``), fp32, one rounding."""
    return w + bias * params.scaling


# the whole-tensor ops streamed per module (extract, combine, SVD init) register with this module
from . import lora_streamed, nf4_merge  # noqa: E402,F401
