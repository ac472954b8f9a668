"""TIES's sign election (Yadav et al. 2023, "TIES-Merging") over weighted, sparsified task vectors
in one compiled loop: the ``consensus: sum`` branch of ``merge.task_arithmetic`` for fp32 CPU
tiles, when numba is installed.

Per entry, in the torch path's order and fp32 roundings: votes = Σ wi (left to right), majority =
copysign(1, votes), agreeing_i = max(wi · majority, 0), mixed = Σ agreeing_i · majority, divisor =
Σ sign(agreeing_i) · weight_i (clamped at min weight / 2 when every weight is positive, else 0 -> 1),
then mixed / divisor if ``normalize``, times λ if λ != 1, plus the base. The torch path makes about
fifteen passes over the tile with two tile-sized temporaries; this is one, and the same bits
(signed zeros included; a tile with a non-finite entry goes back to the torch path, whose NaN
rules it does not copy). Compared with the torch path in ``tests/test_exact_topk.py``.
"""
from __future__ import annotations

import numpy as np
import torch

try:
    import numba as _numba
except ImportError:   # pragma: no cover - exercised where numba is absent
    _numba = None

USE_NUMBA = _numba is not None   # tests switch it off to compare with the torch path


def elect(weighted: list[torch.Tensor], weights, base: torch.Tensor, normalize: bool, lam: float) -> torch.Tensor | None:
    """base + λ · (TIES election of ``weighted``, divided by the agreeing weights if ``normalize``),
    as ``merge.task_arithmetic`` computes it; None where the compiled loop does not apply (no
    numba, not fp32 CPU tiles of one shape, or a non-finite entry)."""
    if (not USE_NUMBA or base.device.type != "cpu" or base.dtype != torch.float32
            or any(w.dtype != torch.float32 or w.device.type != "cpu" or w.shape != base.shape for w in weighted)):
        return None
    stacked = np.stack([w.detach().reshape(-1).numpy() for w in weighted])     # [models, entries]
    flat_base = base.detach().reshape(-1).contiguous().numpy()
    out = np.empty_like(flat_base)
    positive = min(weights) > 0
    floor = np.float32(min(weights) / 2) if positive else np.float32(0)
    ok = _elect_nb(stacked, np.asarray(weights, dtype=np.float32), flat_base, out, normalize, positive, floor,
                   np.float32(lam), lam != 1)
    return torch.from_numpy(out).reshape(base.shape) if ok else None


if _numba is not None:
    @_numba.njit(cache=True, nogil=True)
    def _elect_nb(weighted, weights, base, out, normalize, positive, floor, lam, scale):
        zero, one = np.float32(0.0), np.float32(1.0)
        models = weighted.shape[0]
        for j in range(base.size):
            votes = weighted[0, j]
            for i in range(1, models):
                votes = votes + weighted[i, j]
            if not np.isfinite(votes):
                return False
            majority = np.copysign(one, votes)
            mixed, divisor = zero, zero
            for i in range(models):
                agreeing = weighted[i, j] * majority
                if agreeing < zero:   # noqa: PLR1730  (max() would not say which zero it keeps)
                    agreeing = zero
                mixed = mixed + agreeing
                divisor = divisor + (one if agreeing > zero else zero) * weights[i]
            mixed = mixed * majority
            if normalize:
                if positive:
                    if divisor < floor:   # noqa: PLR1730
                        divisor = floor
                elif divisor == zero:
                    divisor = one
                mixed = mixed / divisor
            if scale:
                mixed = mixed * lam
            out[j] = mixed + base[j]
        return True
