"""Truncated SVDs of weight deltas for LoRA extraction: the exact Gram route and the randomised one.

``extract_lora`` (and the streamed ``lora_extract`` op, ``ops.lora_streamed``) factor a delta
D = W_ft - W_base (out x in) as B @ A with B @ A its best rank-r approximation. Two methods:

- ``"gram"`` (the default): the Gram matrix G of D on its smaller side (D Dᵀ when out <= in,
  else Dᵀ D; at most min(out, in)² fp32 entries) is summed over slabs of D, its top-r
  eigenvectors V come from a dense symmetric eigendecomposition, and the factors are the SVD of
  the exact projection Vᵀ D (or D V): the truncated SVD to fp32 accuracy even where the
  spectrum has a flat tail (noise), where subspace iteration converges slowly. Cost
  2·out·in·min(out, in) flops for G plus an eigendecomposition of a min(out, in)² matrix, and
  no fp32 copy of the whole delta (slabs of about ``SLAB_ELEMENTS`` entries at a time).
- ``"randomized"``: Halko, Martinsson & Tropp (2011), a Gaussian sketch of r + oversample
  columns and ``power_iters`` subspace iterations; cheaper where min(out, in) is large, but on
  a flat tail it keeps about 1e-3 less energy than the exact truncation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import NonFiniteValues

SVD_METHODS = ("gram", "randomized")
SVD_CHOICES = ("auto", "exact", "randomized")   # what `lora extract --svd` offers
GRAM_MAX_SIDE = 4096    # auto: the exact Gram route up to this min(out, in); its eigh grows as the cube


def svd_method_for(choice: str, shape: tuple[int, ...]) -> str:
    """The SVD method (:data:`SVD_METHODS`) that ``--svd choice`` gives a module of ``shape``:
    ``exact`` -> ``gram``; ``randomized`` -> ``randomized``; ``auto`` -> ``gram`` while
    min(out, in) <= :data:`GRAM_MAX_SIDE` (an 8B model's 4096-wide modules included), else
    ``randomized`` (a 70B model's 8192-wide modules: a 256 MiB Gram and ~8x the eigh of 4096)."""
    if choice not in SVD_CHOICES:
        raise ValueError(f"svd must be one of {SVD_CHOICES}, got {choice!r}")
    if choice == "exact" or (choice == "auto" and min(shape) <= GRAM_MAX_SIDE):
        return "gram"
    return "randomized"
SLAB_ELEMENTS = 1 << 20          # entries of D per slab (4 MiB fp32) while G and V^T D are summed


def randomized_svd(M: torch.Tensor, rank: int, *, oversample: int = 10, power_iters: int = 2,
                   generator: torch.Generator | None = None):
    """Truncated SVD of M by randomised range finding (Halko, Martinsson, Tropp 2011).

    Y = M Omega with a Gaussian Omega of rank + oversample columns, ``power_iters`` rounds of
    re-orthonormalised subspace iteration (each sharpens the spectrum by sigma^2), then the exact
    SVD of the small projection Q^T M. Exact when rank(M) <= rank + oversample.

    Returns:
        (U: m x k, S: k, Vh: k x n) with k = min(rank, m, n), in M's (floating) dtype.
    """
    m, n = M.shape
    k = min(rank + oversample, m, n)
    # drawn on the generator's (CPU) device so a GPU run sees the same projection
    omega = torch.randn(n, k, generator=generator, dtype=M.dtype).to(M.device)
    Q, _ = torch.linalg.qr(M @ omega)                    # m x k
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(M.T @ Q)                   # n x k
        Q, _ = torch.linalg.qr(M @ Z)                     # m x k
    Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)  # k x n projection
    r = min(rank, m, n)
    return (Q @ Ub)[:, :r], S[:r], Vh[:r]


def delta_slab(ft: torch.Tensor, base: torch.Tensor | None, lo: int, hi: int, wide: bool) -> torch.Tensor:
    """Columns (``wide``) or rows lo:hi of ft - base as a fresh contiguous fp32 tensor, equal to
    the same slice of ``ft.float() - base.float()`` (bf16 / fp16 / fp32 values are exact in fp32);
    ``base=None`` slices ``ft`` itself. The inputs are never written to."""
    f = ft[:, lo:hi] if wide else ft[lo:hi]
    out = torch.empty(f.shape, dtype=torch.float32, device=f.device)
    out.copy_(f)
    if base is not None:
        out.sub_(base[:, lo:hi] if wide else base[lo:hi])
    return out


def fp64_squared_norm(x: torch.Tensor, chunk: int = 1 << 18) -> float:
    """||x||_F^2 summed in fp64 over ``chunk``-entry pieces (2 MiB fp64 copies, never a whole one)."""
    flat = x.reshape(-1)
    return float(sum(float(flat[i:i + chunk].double().square().sum()) for i in range(0, flat.numel(), chunk)))


def _top_eigenvectors(G: torch.Tensor, k: int) -> torch.Tensor:
    """The eigenvectors of the symmetric ``G`` for its k largest eigenvalues, as the columns of a
    fresh n x k tensor in descending order. On the CPU the eigenvectors overwrite G (its storage
    read as column-major, which is G itself since G is symmetric) instead of a second n x n copy."""
    n = G.shape[0]
    if G.device.type == "cpu":
        values = torch.empty(n, dtype=G.dtype)
        vectors = G.mT                                   # column-major view of the same storage
        torch.linalg.eigh(vectors, out=(values, vectors))
    else:
        _, vectors = torch.linalg.eigh(G)
    return vectors[:, n - k:].flip(1).contiguous()


def gram_svd(ft: torch.Tensor, base: torch.Tensor | None, rank: int, *, name: str = "the delta"):
    """Truncated SVD of D = ft - base (``base=None``: D = ft) through the Gram matrix of its
    smaller side, exact to fp32 rounding however flat the spectrum (see the module docstring).
    Raises NonFiniteValues (naming ``name``) when D has a NaN or infinite entry.

    Returns:
        (U: m x k, S: k descending, Vh: k x n, ||D||_F^2) with k = min(rank, m, n); U and Vh in
        fp32 with orthonormal columns / rows, ||D||^2 summed in fp64 per slab.
    """
    m, n = ft.shape
    wide = m <= n                                   # G = D D^T (m x m) when wide, else D^T D (n x n)
    small, long = (m, n) if wide else (n, m)
    step = max(1, SLAB_ELEMENTS // max(1, small))
    k = min(rank, small)
    G = torch.zeros(small, small, dtype=torch.float32, device=ft.device)
    total = 0.0
    for lo in range(0, long, step):
        d = delta_slab(ft, base, lo, min(long, lo + step), wide)
        total += fp64_squared_norm(d)
        if wide:
            G.addmm_(d, d.T)
        else:
            G.addmm_(d.T, d)
        del d
    _check_finite(total, name)
    V = _top_eigenvectors(G, k)                     # small x k
    del G
    pieces = []                                     # slabs of the projection V^T D (k x n) or D V (m x k)
    for lo in range(0, long, step):
        d = delta_slab(ft, base, lo, min(long, lo + step), wide)
        pieces.append(V.T @ d if wide else d @ V)
        del d
    C = torch.cat(pieces, dim=1 if wide else 0)
    del pieces
    Uc, S, Vhc = torch.linalg.svd(C, full_matrices=False)
    if wide:
        return V @ Uc, S, Vhc, total
    return Uc, S, Vhc @ V.T, total


def _check_finite(total: float, name: str) -> None:
    if not math.isfinite(total):
        raise NonFiniteValues(f"{name} has NaN or infinite entries (||delta||^2 = {total}); expected finite weights")


@dataclass
class ExtractedLora:
    """A LoRA extracted from a delta: B @ A approximates it; ``captured`` = ||B A||_F^2 / ||D||_F^2."""

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    captured: float
    delta_energy: float


def truncated_svd(ft: torch.Tensor, base: torch.Tensor | None, rank: int, *, method: str = "gram",
                  oversample: int = 10, power_iters: int = 2, generator: torch.Generator | None = None,
                  name: str = "the delta"):
    """(U, S, Vh, ||D||_F^2) of the rank-``rank`` truncated SVD of D = ft - base (``base=None``:
    D = ft) by ``method`` (:data:`SVD_METHODS`), fp32. ``"randomized"`` forms the whole fp32 D
    and uses ``oversample``, ``power_iters`` and ``generator``; ``"gram"`` ignores them and is
    deterministic. Raises NonFiniteValues (naming ``name``) for a NaN or infinite entry of D."""
    if method == "gram":
        return gram_svd(ft, base, rank, name=name)
    if method != "randomized":
        raise ValueError(f"method must be one of {SVD_METHODS}, got {method!r}")
    D = ft.float() if base is None else delta_slab(ft, base, 0, ft.shape[1], True)
    total = fp64_squared_norm(D)
    _check_finite(total, name)
    return (*randomized_svd(D, rank, oversample=oversample, power_iters=power_iters, generator=generator), total)


def extract_lora(delta: torch.Tensor, rank: int | None = None, energy: float | None = None, *,
                 max_rank: int | None = None, method: str = "gram", oversample: int = 10, power_iters: int = 2,
                 generator: torch.Generator | None = None) -> ExtractedLora:
    """Rank-``rank`` (or smallest rank reaching ``energy``) LoRA of a weight delta W_ft - W_base.

    The truncated SVD by ``method`` (see :func:`truncated_svd`; ``"gram"``, the default, is the
    exact truncation to fp32 rounding, ``"randomized"`` uses ``power_iters`` >= 2 and
    ``generator``), in fp32; B = U sqrt(S), A = sqrt(S) V^T so that B @ A is the truncated SVD
    (use scaling 1, i.e. lora_alpha = r, or divide B by s).

    Args:
        delta: out x in (any float dtype; computed in fp32).
        rank or energy: as in :func:`ops.lora.refactor`; with ``energy`` the search is capped at
            ``max_rank`` (default min(out, in)).
        generator: the seeded generator for the random projection (``"randomized"`` only).
    Returns:
        :class:`ExtractedLora` with the captured energy fraction.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank or energy")
    if power_iters < 2:
        raise ValueError(f"power_iters must be >= 2, got {power_iters}")
    cap = min(delta.shape) if rank is None else rank
    if max_rank is not None:
        cap = min(cap, max_rank)
    U, S, Vh, total = truncated_svd(delta, None, cap, method=method, oversample=oversample,
                                    power_iters=power_iters, generator=generator)
    if energy is not None:
        e = S.double() ** 2
        cum = torch.cumsum(e, 0) / total if total > 0 else torch.ones_like(e)
        hit = (cum >= energy - 1e-12).nonzero()
        cap = int(hit[0]) + 1 if hit.numel() else S.numel()
    cap = min(cap, S.numel())
    root = S[:cap].sqrt()
    captured = float((S[:cap].double() ** 2).sum()) / total if total > 0 else 1.0
    return ExtractedLora(A=root[:, None] * Vh[:cap], B=U[:, :cap] * root[None, :], rank=cap,
                         captured=captured, delta_energy=total)
