"""NumPy reference of the exact delta's kernels (:mod:`.exact_lanes`), and the fallback where numba
is absent: ULP differences, symbols and byte planes, the per-exponent Huffman bit lanes, their
Python-loop decoder, and applying a difference to a base. Encoding here writes the same bytes as
the compiled kernels (the tests check it); decoding is a Python loop, correct but ~500x slower.
"""
from __future__ import annotations

import numpy as np

from .exact_lanes import ESCAPE, LANES, TABLE_SIZE


def mono_np(x: np.ndarray, bits: int) -> np.ndarray:
    """Bit patterns -> unsigned integers ordered like the floats (positive: set the sign bit;
    negative: invert every bit)."""
    sign = np.array(1 << (bits - 1), dtype=x.dtype)
    return np.where(x & sign, ~x, x | sign)


def unmono_np(m: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`mono_np`."""
    sign = np.array(1 << (bits - 1), dtype=m.dtype)
    return np.where(m & sign, m ^ sign, ~m)


def zigzag_np(base: np.ndarray, target: np.ndarray, bits: int) -> np.ndarray:
    """Zigzagged wrapped ULP differences ``target - base`` as uint64 (0, -1, 1, -2 -> 0, 1, 2, 3)."""
    full = (1 << bits) - 1
    d = (mono_np(target, bits).astype(np.int64) - mono_np(base, bits).astype(np.int64)) & full
    d = np.where(d >> (bits - 1), d - (1 << bits), d)         # signed
    return ((d << 1) ^ (d >> 63)).astype(np.uint64)


def apply_np(base: np.ndarray, z: np.ndarray, bits: int, word) -> np.ndarray:
    """``base`` moved by the zigzagged ULP differences ``z`` (uint64), as ``word`` bit patterns."""
    d = (z >> np.uint64(1)).astype(np.int64) ^ -(z & np.uint64(1)).astype(np.int64)
    m = (mono_np(base, bits).astype(np.int64) + d) & ((1 << bits) - 1)
    return unmono_np(m.astype(word), bits)


def symbols_np(base, target, bits: int, k: int, word):
    """(symbols min(z >> k, 255) uint8, k/8 low byte planes of z (plane-major, element order),
    escapes: z >> k of the symbols that are 255, element order, as ``word``)."""
    z = zigzag_np(base, target, bits)
    high = z >> np.uint64(k)
    sym = np.minimum(high, ESCAPE).astype(np.uint8)
    esc = high[high >= ESCAPE].astype(word)
    planes = [((z >> np.uint64(8 * j)) & np.uint64(0xFF)).astype(np.uint8) for j in range(k // 8)]
    return sym, (np.concatenate(planes) if planes else np.empty(0, np.uint8)), esc


def pack_np(sym: np.ndarray, table_of: np.ndarray, codes: np.ndarray, lengths: np.ndarray):
    """Bit lanes as (one uint64 array, lane start word, lane bit counts): element i's code (table
    ``table_of[i]``) appended LSB first to lane i % LANES. Same words as the numba kernel."""
    index = table_of.astype(np.int64) * 256 + sym
    lanes, bit_counts = [], []
    for lane in range(LANES):
        code, length = codes[index[lane::LANES]], lengths[index[lane::LANES]].astype(np.int64)
        total = int(length.sum())
        owner = np.repeat(np.arange(code.size), length)
        offset = np.arange(total) - np.repeat(np.cumsum(length) - length, length)
        bits = ((code[owner] >> offset.astype(np.uint64)) & np.uint64(1)).astype(np.uint8)
        packed = np.packbits(bits, bitorder="little")
        padded = np.zeros(-(-packed.size // 8) * 8, np.uint8)
        padded[:packed.size] = packed
        lanes.append(padded.view("<u8"))
        bit_counts.append(total)
    return _join(lanes, bit_counts)


def _join(lanes, bit_counts):
    starts = np.cumsum([0] + [w.size for w in lanes])[:-1].astype(np.int64)
    return np.concatenate(lanes).astype("<u8"), starts, np.array(bit_counts, np.int64)


def decode_py(words, starts, bit_counts, dec, ctx_off, exps, n):
    """Symbols of every element (uint8) from the lanes; None when a lane does not end exactly at
    its recorded bit count (a corrupt payload). The Python-loop fallback of the numba kernel."""
    w = [int(x) for x in words]
    table = dec.tolist()
    offsets = ctx_off[exps].tolist()
    sym = np.empty(n, np.uint8)
    out = [0] * n
    for lane in range(LANES):
        p = int(starts[lane]) * 64
        end = p + int(bit_counts[lane])
        for i in range(lane, n, LANES):
            if p > end:
                return None
            q = p >> 6
            entry = table[offsets[i] + (((w[q] | (w[q + 1] << 64)) >> (p & 63)) & (TABLE_SIZE - 1))]
            out[i] = entry >> 8
            p += entry & 0xFF
        if p != end:
            return None
    sym[:] = out
    return sym
