"""Exact delta, format 1 (read for artifacts written before format 2; written only on request).

Symbols ``min(zigzag(ULP difference) >> k, 255)`` and ``k`` low byte planes, laid out **sorted by
the base weight's exponent** (a stable counting sort, so the permutation follows from the base and
nothing extra is stored), then zstd with its match finder off: zstd's per-block Huffman tables see
(mostly) one exponent at a time. Escapes (symbol 255) keep their full value in element order.
The sort's inverse, a gather into element order, was most of the decode time; format 2
(:mod:`.exact_huff`) codes in element order with a Huffman table per exponent instead.

Kernels are compiled with numba when it is installed; NumPy (stable argsort) gives the same bytes.
"""
from __future__ import annotations

import struct

import numpy as np

from ..errors import CodecError
from .exact_lanes import ESCAPE, _numba
from .exact_ref import mono_np as _mono
from .exact_ref import unmono_np as _unmono
from .exact_ref import zigzag_np as _zigzag_np

VERSION = 1
HEADER = struct.Struct("<4sBBBBQQQQQ")   # magic, version, dtype, k, flags, n, n_esc, len sym / low / esc
_WORD = {16: np.uint16, 32: np.uint32}


def _encode_np(base, target, bits, eshift, emask, k):
    z = _zigzag_np(base, target, bits)
    order = np.argsort((base >> eshift) & emask, kind="stable")
    zs = z[order]
    high = zs >> np.uint64(k)
    sym = np.minimum(high, ESCAPE).astype(np.uint8)
    esc = (z >> np.uint64(k))
    esc = esc[esc >= ESCAPE].astype(_WORD[bits])
    planes = [((zs >> np.uint64(8 * j)) & np.uint64(0xFF)).astype(np.uint8) for j in range(k // 8)]
    low = np.concatenate(planes) if planes else np.empty(0, np.uint8)
    return sym, low, esc


def _decode_np(base, sym, low, esc, bits, eshift, emask, k):
    n = base.size
    order = np.argsort((base >> eshift) & emask, kind="stable")
    zs = sym.astype(np.uint64)
    is_esc = np.empty(n, dtype=bool)
    is_esc[order] = sym == ESCAPE
    high = np.empty(n, np.uint64)
    high[order] = zs
    high[is_esc] = esc.astype(np.uint64)          # escapes are stored in element order
    z = high << np.uint64(k)
    for j in range(k // 8):
        plane = np.empty(n, np.uint64)
        plane[order] = low[j * n:(j + 1) * n]
        z |= plane << np.uint64(8 * j)
    d = (z >> np.uint64(1)).astype(np.int64) ^ -(z & np.uint64(1)).astype(np.int64)
    full = (1 << bits) - 1
    m = (_mono(base, bits).astype(np.int64) + d) & full
    return _unmono(m.astype(_WORD[bits]), bits)


if _numba is not None:
    from .exact_lanes import _apply_one, apply16_nb   # the same per-element kernels as format 2

    @_numba.njit(cache=True, nogil=True)
    def _offsets(base, eshift, emask):
        """Start of each exponent's run in the sorted layout (4 interleaved histograms: no
        store-to-load chain when neighbours share an exponent)."""
        n = base.size
        hist = np.zeros((4, emask + 2), np.int64)
        quad = n - n % 4
        for i in range(0, quad, 4):
            for j in range(4):
                hist[j, ((np.int64(base[i + j]) >> eshift) & emask) + 1] += 1
        for i in range(quad, n):
            hist[0, ((np.int64(base[i]) >> eshift) & emask) + 1] += 1
        starts = hist[0] + hist[1] + hist[2] + hist[3]
        for e in range(1, emask + 2):
            starts[e] += starts[e - 1]
        return starts

    @_numba.njit(cache=True, nogil=True)
    def _encode_nb(base, target, bits, eshift, emask, k):
        n = base.size
        pos = _offsets(base, eshift, emask)
        sign = np.int64(1) << (bits - 1)
        full = (np.int64(1) << bits) - 1
        half = full >> 1
        kb = k // 8
        sym = np.empty(n, np.uint8)
        low = np.empty(n * kb, np.uint8)
        esc = np.empty(n, np.int64)
        ne = 0
        for i in range(n):
            b = np.int64(base[i])
            f = np.int64(target[i])
            mb = b ^ (((b >> (bits - 1)) * half) | sign)          # monotonic, branch-free
            mf = f ^ (((f >> (bits - 1)) * half) | sign)
            d = (((mf - mb) & full) ^ sign) - sign                # wrapped difference, signed
            z = (d << 1) ^ (d >> 63)                              # zigzag
            high = z >> k
            e = (b >> eshift) & emask
            p = pos[e]
            pos[e] = p + 1
            if high >= 255:
                sym[p] = 255
                esc[ne] = high
                ne += 1
            else:
                sym[p] = high
            for j in range(kb):
                low[j * n + p] = (z >> (8 * j)) & 0xFF
        return sym, low, esc[:ne]

    @_numba.njit(cache=True, nogil=True)
    def _zigzag16_k0(base, target, high):
        """bf16 / fp16 symbols min(zigzag(ULP difference), 255) in element order; vectorisable."""
        for i in range(base.size):
            b = np.int32(base[i])
            f = np.int32(target[i])
            mb = b ^ (((b >> 15) * 0x7FFF) | 0x8000)
            mf = f ^ (((f >> 15) * 0x7FFF) | 0x8000)
            d = (((mf - mb) & 0xFFFF) ^ 0x8000) - 0x8000
            z = (d << 1) ^ (d >> 31)
            high[i] = min(z, 255)

    @_numba.njit(cache=True, nogil=True)
    def _encode16_k0(base, target, eshift, emask):
        """Two passes: symbols in element order (SIMD), then scattered into exponent order."""
        n = base.size
        high = np.empty(n, np.uint8)
        _zigzag16_k0(base, target, high)
        pos = _offsets(base, eshift, emask)
        sym = np.empty(n, np.uint8)
        esc = np.empty(n, np.int64)
        ne = 0
        for i in range(n):
            e = (np.int64(base[i]) >> eshift) & emask
            p = pos[e]
            pos[e] = p + 1
            h = high[i]
            sym[p] = h
            if h == 255:                                      # rare: keep the full value
                b = np.int64(base[i])
                f = np.int64(target[i])
                mb = b ^ (((b >> 15) * 0x7FFF) | 0x8000)
                mf = f ^ (((f >> 15) * 0x7FFF) | 0x8000)
                d = (((mf - mb) & 0xFFFF) ^ 0x8000) - 0x8000
                esc[ne] = (d << 1) ^ (d >> 63)
                ne += 1
        return sym, np.empty(0, np.uint8), esc[:ne]

    @_numba.njit(cache=True, nogil=True)
    def _unpermute_nb(base, sym, low, kb, eshift, emask, n_esc):
        """Symbols and low byte planes back in element order; positions of the escapes."""
        n = base.size
        pos = _offsets(base, eshift, emask)
        high = np.empty(n, np.uint8)
        lows = np.empty(n * kb, np.uint8)
        esc_at = np.empty(n_esc, np.int64)
        ne = 0
        for i in range(n):
            e = (np.int64(base[i]) >> eshift) & emask
            p = pos[e]
            pos[e] = p + 1
            h = sym[p]
            high[i] = h
            if h == 255:
                if ne < n_esc:                                # corrupt payloads must not write past the end
                    esc_at[ne] = i
                ne += 1
            for j in range(kb):
                lows[j * n + i] = low[j * n + p]
        return high, lows, esc_at, ne

    @_numba.njit(cache=True, nogil=True)
    def _apply_nb(base, high, lows, kb, esc, esc_at, bits, out):
        n = base.size
        k = 8 * kb
        if bits == 16 and kb == 0:
            apply16_nb(base, high, out)
        else:
            for i in range(n):
                z = np.int64(high[i]) << k
                for j in range(kb):
                    z |= np.int64(lows[j * n + i]) << (8 * j)
                out[i] = _apply_one(np.int64(base[i]), z, bits)
        for t in range(esc_at.size):                          # rare: large deltas
            i = esc_at[t]
            z = np.int64(esc[t]) << k
            for j in range(kb):
                z |= np.int64(lows[j * n + i]) << (8 * j)
            out[i] = _apply_one(np.int64(base[i]), z, bits)

    def _decode_nb(base, sym, low, esc, bits, eshift, emask, k, out):
        high, lows, esc_at, found = _unpermute_nb(base, sym, low, k // 8, eshift, emask, esc.size)
        if found != esc.size:
            raise CodecError(f"exact delta: {found} escapes in the payload, header says {esc.size}")
        _apply_nb(base, high, lows, k // 8, esc, esc_at, bits, out)




def encode_v1(b, t, code, bits, eshift, emask, k, compress, use_numba: bool) -> bytes:
    """Format-1 bytes of target words ``t`` against base words ``b`` (not identical)."""
    if use_numba and _numba is not None:
        if bits == 16 and k == 0:
            sym, low, esc = _encode16_k0(b, t, eshift, emask)
        else:
            sym, low, esc = _encode_nb(b, t, bits, eshift, emask, k)
        esc = esc.astype(_WORD[bits])
    else:
        sym, low, esc = _encode_np(b, t, bits, eshift, emask, k)
    parts = [compress(sym.tobytes()), compress(low.tobytes()) if low.size else b"",
             compress(esc.tobytes()) if esc.size else b""]
    head = HEADER.pack(b"TSDX", VERSION, code, k, 0, b.size, esc.size, *(len(p) for p in parts))
    return head + b"".join(parts)


def parse_v1(data: bytes):
    """(dtype code, k, flags, n, escapes, [sym, low, esc blobs]); CodecError on inconsistent sizes."""
    if len(data) < HEADER.size:
        raise CodecError(f"exact delta: {len(data)} bytes is shorter than the header")
    _, _, code, k, flags, n, n_esc, *lens = HEADER.unpack_from(data)
    if HEADER.size + sum(lens) != len(data):
        raise CodecError(f"exact delta: header promises {HEADER.size + sum(lens)} bytes, got {len(data)}")
    blobs, start = [], HEADER.size
    for length in lens:
        blobs.append(data[start:start + length])
        start += length
    return code, k, flags, n, n_esc, blobs


def decode_v1(b, parsed, bits, eshift, emask, word, decompress, use_numba: bool) -> np.ndarray:
    """Target words from base words ``b`` and :func:`parse_v1`'s fields."""
    _, k, _, n, n_esc, blobs = parsed
    sym = decompress(blobs[0], n, np.uint8)
    low = decompress(blobs[1], n * (k // 8), np.uint8) if blobs[1] else np.empty(0, np.uint8)
    esc = decompress(blobs[2], n_esc, word) if blobs[2] else np.empty(0, word)
    if sym.size != n or low.size != n * (k // 8) or esc.size != n_esc:
        raise CodecError("exact delta: payload sizes do not match the header")
    if use_numba and _numba is not None:   # counts the escapes while it unpermutes
        out = np.empty(n, word)
        _decode_nb(b, sym, low, esc, bits, eshift, emask, k, out)
        return out
    if int(np.count_nonzero(sym == ESCAPE)) != n_esc:
        raise CodecError("exact delta: escapes in the payload do not match the header")
    return _decode_np(b, sym, low, esc, bits, eshift, emask, k)
