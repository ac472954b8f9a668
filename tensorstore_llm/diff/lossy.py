"""Lossy delta kernels: pure functions of Δ = fine-tune − base (fp32) returning Δ̂ and its parts.

Each kernel returns a :class:`Lossy` record: the approximation ``approx`` (fp32, same shape), the
arrays a codec stores (``parts``) and how many bytes they take uncompressed. Errors are computed
by :func:`delta_error` on what is actually reconstructed, never estimated.

- ``bf16_round``: Δ rounded to bf16 (dense).
- ``low_rank``: truncated randomised SVD (Halko, Martinsson & Tropp 2011) with power iterations,
  at a rank r or at the smallest rank holding a target share of ‖Δ‖²; factors stored in bf16.
  Eckart–Young: the best rank-r error is sqrt(Σ_{i>r} σ_i²).
- ``top_k``: the largest-|Δ| share of entries (values in bf16 + a bitmap).
- ``dare``: DARE (Yu et al. 2024, "Language Models are Super Mario"): keep each entry with
  probability p and rescale by 1/p; the mask is drawn from the per-tensor seed
  (:mod:`tensorstore_llm.seeding`), so only the kept values are stored and any row blocking draws
  the same mask.
- ``bitdelta``: BitDelta (Liu et al. 2024): sign(Δ) with a scale per matrix or per row; the
  L2-optimal scale for a sign matrix is mean |Δ| (over the matrix or the row).
- ``mixed_svd``: Delta-CoMe (Ping et al. 2024): singular vectors in groups by singular value,
  quantised with more bits for the larger singular values (e.g. 8 bits for the top 2, 3 bits
  for the next 32, 2 bits for the next 64, the rest dropped), per-column absmax scales.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CodecError


@dataclass
class Lossy:
    """A lossy approximation of one delta tensor: ``approx`` (fp32) and the arrays that store it."""

    approx: torch.Tensor
    parts: dict = field(default_factory=dict)   # name -> np.ndarray actually stored
    info: dict = field(default_factory=dict)    # rank, density, ... for reports


def bf16_round(delta: torch.Tensor) -> Lossy:
    """Δ rounded to bf16 (round to nearest even).

    Example:
        >>> bf16_round(torch.tensor([1.0, 1.001])).approx.tolist()
        [1.0, 1.0]
    """
    q = delta.to(torch.bfloat16)
    return Lossy(q.float(), {"values": q.view(torch.int16).numpy()})


def randomized_svd(a: torch.Tensor, rank: int, oversample: int = 10, power_iters: int = 2,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated randomised SVD of a 2-D fp32 matrix: (U[m, r], S[r], Vh[r, n]).

    Range finder with ``power_iters`` subspace iterations (re-orthonormalised each time), then an
    exact SVD of the small projected matrix. The sketch is drawn from a seeded CPU generator.

    Example:
        >>> u, s, vh = randomized_svd(torch.eye(4), 2)
        >>> s.tolist()
        [1.0, 1.0]
    """
    m, n = a.shape
    k = min(m, n, rank + oversample)
    gen = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(n, k, generator=gen, dtype=a.dtype)
    q = torch.linalg.qr(a @ omega).Q                        # [m, k]
    for _ in range(power_iters):
        q = torch.linalg.qr(a.T @ q).Q                      # [n, k]
        q = torch.linalg.qr(a @ q).Q                        # [m, k]
    u_small, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)   # [k, k], [k], [k, n]
    r = min(rank, k)
    return (q @ u_small)[:, :r], s[:r], vh[:r]


def _rank_for_energy(s: torch.Tensor, total: float, energy: float) -> int:
    """Smallest rank whose singular values hold ``energy`` of the total squared norm (or None)."""
    cum = torch.cumsum(s.double() ** 2, 0)
    hit = torch.nonzero(cum >= energy * total)
    return int(hit[0]) + 1 if hit.numel() else None


def low_rank(delta: torch.Tensor, rank: int | None = None, energy: float | None = None,
             power_iters: int = 2, seed: int = 0) -> Lossy:
    """Δ ≈ (U·S) @ Vh at ``rank``, or at the smallest rank holding ``energy`` of ‖Δ‖²_F.

    With ``energy`` the sketch grows (doubling) until the captured energy reaches the target or
    the rank is full; factors are stored in bf16 and ``approx`` is built from the stored factors.

    Example:
        >>> d = torch.outer(torch.arange(4.0), torch.ones(3))
        >>> low_rank(d, rank=1).info["rank"]
        1
    """
    if (rank is None) == (energy is None):
        raise CodecError("low_rank: give exactly one of rank or energy")
    if power_iters < 2:
        raise CodecError(f"low_rank: power_iters must be >= 2, got {power_iters}")
    m, n = delta.shape
    full = min(m, n)
    if rank is not None:
        u, s, vh = randomized_svd(delta, rank, power_iters=power_iters, seed=seed)
    else:
        if not 0.0 < energy <= 1.0:
            raise CodecError(f"low_rank: energy must be in (0, 1], got {energy}")
        total = float(delta.double().pow(2).sum())
        guess = 16
        while True:
            u, s, vh = randomized_svd(delta, min(guess, full), power_iters=power_iters, seed=seed)
            r = _rank_for_energy(s, total, energy) if total > 0 else 1
            if r is not None or guess >= full:
                r = r or full
                u, s, vh = u[:, :r], s[:r], vh[:r]
                break
            guess *= 2
    left = (u * s).to(torch.bfloat16)                      # [m, r]
    right = vh.to(torch.bfloat16)                          # [r, n]
    approx = left.float() @ right.float()
    return Lossy(approx, {"left": left.view(torch.int16).numpy(), "right": right.view(torch.int16).numpy()},
                 {"rank": int(s.numel()), "singular_values": s})


def top_k(delta: torch.Tensor, density: float) -> Lossy:
    """Keep the ``density`` share of entries with the largest |Δ| (ties broken by position).

    Example:
        >>> top_k(torch.tensor([0.1, -3.0, 2.0, 0.0]), 0.5).approx.tolist()
        [0.0, -3.0, 2.0, 0.0]
    """
    if not 0.0 < density <= 1.0:
        raise CodecError(f"top_k: density must be in (0, 1], got {density}")
    flat = delta.reshape(-1)
    k = max(1, int(round(density * flat.numel())))
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[idx] = True
    values = flat[mask].to(torch.bfloat16)
    approx = torch.zeros_like(flat)
    approx[mask] = values.float()
    return Lossy(approx.reshape(delta.shape),
                 {"mask": np.packbits(mask.numpy()), "values": values.view(torch.int16).numpy()},
                 {"density": k / flat.numel()})


def dare_mask(shape, keep: float, seed: int, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The DARE keep-mask of rows ``start:stop`` of tensor ``name``: uniform < ``keep``.

    Drawn per canonical row group from (seed, "dare-delta", name), so the rows of any block split
    see the same mask.
    """
    from ..seeding import uniform_rows

    stop = shape[0] if stop is None else stop
    return uniform_rows(seed, "dare-delta", name, tuple(shape), start, stop) < keep


def dare(delta: torch.Tensor, keep: float, seed: int, name: str, start: int = 0) -> Lossy:
    """DARE with rescale on rows ``start:start+len(delta)``: Δ·mask/keep, mask from the seed.

    Only the kept values (bf16) are stored; the decoder redraws the mask.

    Example:
        >>> d = torch.ones(4, 4)
        >>> a = dare(d, 0.5, seed=0, name="w").approx
        >>> sorted(set(a.reshape(-1).tolist())) in ([0.0, 2.0], [2.0], [0.0])
        True
    """
    if not 0.0 < keep <= 1.0:
        raise CodecError(f"dare: keep must be in (0, 1], got {keep}")
    full_shape = (start + delta.shape[0], *delta.shape[1:]) if delta.dim() else ()
    mask = dare_mask(full_shape, keep, seed, name, start, start + delta.shape[0])
    values = (delta[mask] / keep).to(torch.bfloat16)
    approx = torch.zeros_like(delta)
    approx[mask] = values.float()
    return Lossy(approx, {"values": values.view(torch.int16).numpy()}, {"density": float(mask.float().mean())})


def bitdelta(delta: torch.Tensor, per_row: bool = False) -> Lossy:
    """Sign(Δ) times the L2-optimal scale mean |Δ| (per matrix, or per row with ``per_row``).

    argmin_a ‖Δ − a·sign(Δ)‖² = mean |Δ|. Zeros get sign +1 (any sign is as good for them).

    Example:
        >>> bitdelta(torch.tensor([[1.0, -3.0]])).approx.tolist()
        [[2.0, -2.0]]
    """
    d2 = delta.reshape(delta.shape[0], -1)                              # [rows, cols]
    scale = d2.abs().mean(dim=1, keepdim=True) if per_row else d2.abs().mean().reshape(1, 1)
    scale = scale.to(torch.bfloat16)
    signs = d2 >= 0
    approx = torch.where(signs, scale.float(), -scale.float())
    return Lossy(approx.reshape(delta.shape),
                 {"signs": np.packbits(signs.reshape(-1).numpy()), "scale": scale.reshape(-1).view(torch.int16).numpy()},
                 {"per_row": per_row})


def _quantise_columns(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest per column: (dequantised, codes int8, scales bf16 bits)."""
    levels = (1 << (bits - 1)) - 1 if bits > 1 else 1
    scale = (x.abs().amax(dim=0, keepdim=True) / levels).to(torch.bfloat16).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(x / safe), -levels - (bits > 1), levels)
    return codes * scale, codes.to(torch.int8).numpy(), scale.to(torch.bfloat16).view(torch.int16).numpy()


def mixed_svd(delta: torch.Tensor, groups: tuple[tuple[int, int], ...] = ((2, 8), (32, 3), (64, 2)),
              power_iters: int = 2, seed: int = 0) -> Lossy:
    """Delta-CoMe-style mixed precision: groups of singular vectors, (count, bits) each, in order.

    U·sqrt(S) and sqrt(S)·Vh are quantised column / row-wise per group; directions past the last
    group are dropped. Stored size counts ``bits`` per entry plus a bf16 scale per column.

    Example:
        >>> d = torch.outer(torch.arange(4.0), torch.ones(3))
        >>> mixed_svd(d, groups=((1, 8),)).info["rank"]
        1
    """
    rank = min(sum(c for c, _ in groups), *delta.shape)
    u, s, vh = randomized_svd(delta, rank, power_iters=power_iters, seed=seed)
    root = s.sqrt()
    left, right = u * root, (vh * root[:, None]).T          # [m, r], [n, r]
    approx = torch.zeros_like(delta)
    parts, start = {}, 0
    for g, (count, bits) in enumerate(groups):
        stop = min(start + count, s.numel())
        if stop <= start:
            break
        lq, lc, ls = _quantise_columns(left[:, start:stop], bits)
        rq, rc, rs = _quantise_columns(right[:, start:stop], bits)
        approx += lq @ rq.T
        parts[f"g{g}_left"] = _pack_codes(lc, bits)
        parts[f"g{g}_right"] = _pack_codes(rc, bits)
        parts[f"g{g}_scales"] = np.concatenate([ls.ravel(), rs.ravel()])
        start = stop
    return Lossy(approx, parts, {"rank": start, "groups": [list(g) for g in groups]})


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes of ``bits`` bits each packed into bytes (offset binary, MSB first)."""
    offset = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8).reshape(-1)
    as_bits = np.unpackbits(offset[:, None], axis=1)[:, 8 - bits:]     # [count, bits]
    return np.packbits(as_bits.reshape(-1))


def delta_error(delta: torch.Tensor, approx: torch.Tensor) -> dict:
    """Frobenius error of an approximation: absolute, squared, relative to ‖Δ‖ (fp64 sums).

    Example:
        >>> delta_error(torch.ones(2), torch.zeros(2))["relative"]
        1.0
    """
    diff = (delta.double() - approx.double())
    err2 = float(diff.pow(2).sum())
    norm2 = float(delta.double().pow(2).sum())
    return {"sq_error": err2, "error": math.sqrt(err2), "sq_norm": norm2,
            "relative": math.sqrt(err2 / norm2) if norm2 > 0 else (0.0 if err2 == 0 else math.inf)}
