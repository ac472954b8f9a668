"""The numba loops of exact top-k's statistics (``topk_kernels.py``), of TIES in one pass
(``ties_fused.py``) and of DARE's drop (``dare_mask.py``). Imported only when one of them first runs
(``topk_kernels.compiled()``), so that a merge that needs none of them never loads numba (~0.3 s and
~100 MiB of RSS for llvmlite). The statistics and TIES loops read fp32 tiles or bf16 tiles as stored
(uint16 bit patterns, widened exactly by ``as_float32``); loops are written over equal-length
slices so that LLVM vectorises them."""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload


def as_float32(x):
    """An entry's fp32 value: a bf16 bit pattern (uint16) widened exactly, as torch casts it
    (NaN payloads kept), or an fp32 as it is (compiled code only: see the overload below)."""
    raise NotImplementedError("compiled code only")


@overload(as_float32, inline="always")
def _as_float32(x):
    if isinstance(x, types.Integer) and x.bitwidth == 16:
        return lambda x: _float32_of_bits(np.uint32(x) << np.uint32(16))
    if x == types.float32:
        return lambda x: x
    return None


@intrinsic
def _float32_of_bits(typingctx, bits):
    """Reinterpret a uint32 as the fp32 with that bit pattern (an LLVM bitcast: no instruction)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@numba.njit(cache=True, nogil=True)
def _difference(base, model, buffer):
    """buffer[:n] = model − base in fp32 (equal-length slices of bf16 patterns or fp32 values):
    one vectorised loop."""
    for j in range(base.size):
        buffer[j] = as_float32(model[j]) - as_float32(base[j])


@numba.njit(cache=True, nogil=True)
def high_counts(base, model, counts, buffer):
    """counts[h] += entries of |model − base| (fp32) whose high 16 bits are h."""
    bits = buffer.view(np.int32)
    n = base.size
    for start in range(0, n, buffer.size):
        stop = min(n, start + buffer.size)
        _difference(base[start:stop], model[start:stop], buffer)
        for j in range(stop - start):
            counts[(bits[j] >> 16) & 0x7FFF] += 1     # sign bit dropped: the bits of |x|


@numba.njit(cache=True, nogil=True)
def low_counts(base, model, high_bin, counts, buffer, cols, found):
    """counts[l] += entries of |model − base| whose bits are (high_bin << 16) | l. With a
    non-empty ``found`` (one slot per entry) each such entry is also listed in flat order as
    (its row in the tile, cols entries a row) << 16 | l; returns how many were listed."""
    bits = buffer.view(np.int32)
    n = base.size
    listed = 0
    record = found.size > 0
    for start in range(0, n, buffer.size):
        stop = min(n, start + buffer.size)
        _difference(base[start:stop], model[start:stop], buffer)
        for j in range(stop - start):
            magnitude = bits[j] & 0x7FFFFFFF
            if (magnitude >> 16) == high_bin:
                counts[magnitude & 0xFFFF] += 1
                if record:
                    found[listed] = ((start + j) // cols << 16) | (magnitude & 0xFFFF)
                    listed += 1
    return listed


@numba.njit(cache=True, nogil=True)
def row_tie_counts(base, model, threshold, out):
    """out[r] = entries of row r (rows of equal length, row-major) with |model − base| == threshold."""
    cols = base.size // out.size
    for r in range(out.size):
        b, m = base[r * cols:(r + 1) * cols], model[r * cols:(r + 1) * cols]
        found = 0
        for j in range(cols):
            found += abs(as_float32(m[j]) - as_float32(b[j])) == threshold
        out[r] = found


@numba.njit(cache=True, nogil=True)
def drop(state, skip, delta, out, p):
    """out = delta * keep for one row group's entries from ``skip`` on: keep is 1 where
    p − u > 0 (fp32), u the 24-bit fraction of the next 32-bit half of SFC64's output."""
    a, b, c, counter = state[0], state[1], state[2], state[3]
    one = np.uint64(1)
    scale = np.float32(2.0 ** -24)
    word = np.uint64(0)
    for e in range(skip + delta.size):   # entries before skip: drawn, not used
        if e % 2 == 0:   # the next 64-bit word: NumPy's sfc64_next
            word = a + b + counter
            counter += one
            a = b ^ (b >> np.uint64(11))
            b = c + (c << np.uint64(3))
            c = ((c << np.uint64(24)) | (c >> np.uint64(40))) + word
            half = word & np.uint64(0xFFFFFFFF)
        else:
            half = word >> np.uint64(32)
        if e < skip:
            continue
        u = np.float32(half & np.uint64(0xFFFFFF)) * scale
        keep = np.float32(1.0) if p - u > np.float32(0.0) else np.float32(0.0)
        out[e - skip] = delta[e - skip] * keep


@numba.njit(cache=True, nogil=True, error_model="numpy")   # IEEE division, no ZeroDivisionError check: vectorises
def ties_merge(base, models, thresholds, keep_all, bounds, whole_stop, cut_start, cut_stop, cut_allow, weights,
               normalize, positive, floor, lam, scale, out, scratch):
    """TIES on one fp32 tile (``ties_fused.py``): per model the magnitude trim (entries before
    ``whole_stop[i]`` keep |τ| >= threshold, or everything where ``keep_all[i]``; entries of
    ``cut_start[i]:cut_stop[i]`` keep |τ| > threshold plus the first ``cut_allow[i]`` equal ones;
    the rest keep |τ| > threshold), weighted, then the sign election, in the torch path's order
    and fp32 roundings. ``bounds`` splits the tile where any model's rule changes; ``scratch`` is
    [models + 3, chunk] fp32."""
    n_models = len(models)
    seen = np.zeros(n_models, dtype=np.int64)
    for b in range(len(bounds) - 1):
        start = bounds[b]
        while start < bounds[b + 1]:
            stop = min(bounds[b + 1], start + scratch.shape[1])
            length = stop - start
            for i in range(n_models):
                mode = 1 if start < whole_stop[i] else 2 if cut_start[i] <= start < cut_stop[i] else 3
                if mode == 1 and keep_all[i]:
                    mode = 0
                seen[i] = _trim(models[i][start:stop], base[start:stop], scratch[i, :length], mode, thresholds[i],
                                seen[i], cut_allow[i], weights[i])
            _elect(scratch, n_models, length, weights, normalize, positive, floor, lam, scale, base[start:stop],
                   out[start:stop])
            start = stop


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _trim(model, base, kept, mode, threshold, seen, allow, weight):
    """kept = weight · (model − base) trimmed by ``mode``: 0 keep all, 1 |τ| >= threshold, 2 the
    cut row (|τ| > threshold and the first ``allow − seen`` equal ones), 3 |τ| > threshold; NaN
    kept as ``hardshrink`` keeps it. Returns the cut row's ties chosen so far."""
    zero = np.float32(0.0)
    if mode == 0:
        for j in range(kept.size):
            kept[j] = (as_float32(model[j]) - as_float32(base[j])) * weight
    elif mode == 1:
        for j in range(kept.size):
            delta = as_float32(model[j]) - as_float32(base[j])
            kept[j] = (zero if abs(delta) < threshold else delta) * weight
    elif mode == 3:
        for j in range(kept.size):
            delta = as_float32(model[j]) - as_float32(base[j])
            kept[j] = (zero if abs(delta) <= threshold else delta) * weight
    else:
        for j in range(kept.size):
            delta = as_float32(model[j]) - as_float32(base[j])
            value = zero if abs(delta) <= threshold else delta
            if abs(delta) == threshold and seen < allow:
                value = value + delta       # the torch path adds the chosen ties to +0
                seen += 1
            kept[j] = value * weight
    return seen


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _elect(scratch, n_models, length, weights, normalize, positive, floor, lam, scale, base, out):
    """out = base + λ · (sum-elected, optionally normalised) mix of scratch[:n_models, :length]."""
    zero, one = np.float32(0.0), np.float32(1.0)
    votes, mixed, divisor = scratch[n_models, :length], scratch[n_models + 1, :length], scratch[n_models + 2, :length]
    votes[:] = scratch[0, :length]
    for i in range(1, n_models):
        kept = scratch[i, :length]
        for j in range(length):
            votes[j] = votes[j] + kept[j]
    for j in range(length):
        votes[j] = np.copysign(one, votes[j])      # the majority sign: ±1, +0 elects +
        mixed[j] = zero
        divisor[j] = zero
    for i in range(n_models):
        kept, weight = scratch[i, :length], weights[i]
        for j in range(length):
            agreeing = kept[j] * votes[j]
            agreeing = zero if zero > agreeing else agreeing   # clamp_min(0): keeps −0 and NaN
            mixed[j] = mixed[j] + agreeing
            divisor[j] = divisor[j] + np.float32(agreeing > zero) * weight   # sign(agreeing) · w; a select here stops LLVM vectorising
    for j in range(length):
        value = mixed[j] * votes[j]
        if normalize:
            d = divisor[j]
            if positive:
                d = floor if floor > d else d
            elif d == zero:
                d = one
            value = value / d
        if scale:
            value = value * lam
        out[j] = value + as_float32(base[j])


