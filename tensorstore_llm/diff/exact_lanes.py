"""Kernels of the exact delta's format 2: symbols, per-exponent Huffman bit lanes, decode + apply.

Element ``i`` of a block goes to bit lane ``i % LANES``; each lane is an LSB-first bit stream of
64-bit little-endian words. A symbol is coded with the Huffman table of its context, the exponent
of the base weight ``base[i]`` (the decoder knows it before it decodes), so no permutation of the
elements is needed: the decoder writes every weight where it belongs, in one pass. Decoding looks
up the next ``MAX_LEN`` bits of a lane in the context's table (``(symbol << 8) | length``, a
uint16 per entry); the lanes are independent dependency chains, so the CPU overlaps their table
look-ups (the interleaved-streams idea of zstd's Huffman decoder and of interleaved rANS).

Compiled with numba when it is installed; the NumPy / Python fallbacks in :mod:`.exact_ref`
produce the same bytes (encoding vectorised; decoding is a Python loop, correct but ~500x slower).
The per-element apply kernels live here too, beside the decoder that calls them, so that numba's
on-disk cache of the decoder is rebuilt whenever one of them changes (the cache is keyed by the
file of the function compiled).
"""
from __future__ import annotations

import numpy as np

LANES = 4
MAX_LEN = 11                      # longest code, bits; decode tables have 2**MAX_LEN entries
TABLE_SIZE = 1 << MAX_LEN
ESCAPE = 255
CHUNK = 1 << 14             # elements decoded and applied at a time (stays in L1 / L2)
GROUP = 5                   # symbols per lane decoded from one 64-bit window (5 x MAX_LEN <= 64)

try:   # optional accelerator: same bytes, compiled passes
    import numba as _numba
except ImportError:   # pragma: no cover - exercised where numba is absent
    _numba = None

_DE_BRUIJN = np.uint64(0x03F79D71B4CB0A89)  # (x * this) >> 58 is distinct for each x = 2**i
_BYTE_OF_BIT = np.zeros(64, np.int64)        # ... and maps to byte i // 8
for _i in range(64):
    _BYTE_OF_BIT[((1 << _i) * 0x03F79D71B4CB0A89 & (2**64 - 1)) >> 58] = _i // 8

# --- numba kernels ----------------------------------------------------------------------------------

if _numba is not None:
    @_numba.njit(cache=True, nogil=True)
    def symbols16_nb(base, target, eshift, emask, sym, hist):
        """bf16 / fp16, k = 0: symbols min(zigzag, 255) and the (exponent, symbol) histogram;
        returns the escapes (full zigzag values, element order)."""
        n = base.size
        esc = np.empty(n, np.uint16)
        ne = 0
        for i in range(n):
            b = np.int32(base[i])
            f = np.int32(target[i])
            mb = b ^ (((b >> 15) * 0x7FFF) | 0x8000)
            mf = f ^ (((f >> 15) * 0x7FFF) | 0x8000)
            d = (((mf - mb) & 0xFFFF) ^ 0x8000) - 0x8000
            z = (d << 1) ^ (d >> 31)
            s = min(z, 255)
            sym[i] = s
            hist[((b >> eshift) & emask) * 256 + s] += 1
            if s == 255:
                esc[ne] = z
                ne += 1
        return esc[:ne]

    @_numba.njit(cache=True, nogil=True)
    def symbols_nb(base, target, bits, k, eshift, emask, sym, low, hist):
        """Any width and k: symbols, low byte planes (plane-major), histogram; returns escapes
        (z >> k, element order, int64)."""
        n = base.size
        sign = np.int64(1) << (bits - 1)
        full = (np.int64(1) << bits) - 1
        half = full >> 1
        kb = k // 8
        esc = np.empty(n, np.int64)
        ne = 0
        for i in range(n):
            b = np.int64(base[i])
            f = np.int64(target[i])
            mb = b ^ (((b >> (bits - 1)) * half) | sign)
            mf = f ^ (((f >> (bits - 1)) * half) | sign)
            d = (((mf - mb) & full) ^ sign) - sign
            z = (d << 1) ^ (d >> 63)
            high = z >> k
            s = min(high, 255)
            sym[i] = s
            hist[((b >> eshift) & emask) * 256 + s] += 1
            if s == 255:
                esc[ne] = high
                ne += 1
            for j in range(kb):
                low[j * n + i] = (z >> (8 * j)) & 0xFF
        return esc[:ne]

    @_numba.njit(cache=True, nogil=True)
    def pack_nb(sym, base, eshift, emask, table_id, codes, lengths):
        """Lanes as (words, lane start word, lane bit counts); the codes of element i from the table
        of its base exponent, appended LSB first to lane i % LANES."""
        n = sym.size
        per_lane = (n + LANES - 1) // LANES
        cap = (per_lane * MAX_LEN) // 64 + 2
        out = np.zeros(LANES * cap, np.uint64)
        acc = np.zeros(LANES, np.uint64)
        filled = np.zeros(LANES, np.int64)
        used = np.zeros(LANES, np.int64)
        for i in range(n):
            lane = i & (LANES - 1)
            t = np.int64(table_id[(np.int64(base[i]) >> eshift) & emask])
            c = codes[t * 256 + sym[i]]
            length = np.int64(lengths[t * 256 + sym[i]])
            nb = filled[lane]
            acc[lane] |= c << np.uint64(nb)
            nb += length
            if nb >= 64:
                out[lane * cap + used[lane]] = acc[lane]
                used[lane] += 1
                nb -= 64
                acc[lane] = (c >> np.uint64(length - nb)) if nb > 0 else np.uint64(0)
            filled[lane] = nb
        starts = np.zeros(LANES, np.int64)
        bit_counts = np.zeros(LANES, np.int64)
        total = 0
        for lane in range(LANES):
            words = used[lane] + (1 if filled[lane] else 0)
            starts[lane] = total
            bit_counts[lane] = used[lane] * 64 + filled[lane]
            total += words
        joined = np.empty(total, np.uint64)
        for lane in range(LANES):
            for w in range(used[lane]):
                joined[starts[lane] + w] = out[lane * cap + w]
            if filled[lane]:
                joined[starts[lane] + used[lane]] = acc[lane]
        return joined, starts, bit_counts

    @_numba.njit(inline="always")
    def _window(words, p):
        """64 bits of ``words`` from bit ``p`` on (LSB first); reads words[p // 64 + 1]."""
        q = np.uint64(p) >> np.uint64(6)
        r = np.uint64(p) & np.uint64(63)
        return (words[q] >> r) | ((words[q + np.uint64(1)] << np.uint64(1)) << (np.uint64(63) - r))

    @_numba.njit(nogil=True)
    def _lanes_chunk(words, ends, dec, ctx, base, eshift, sym, pos, i0, i1):
        """Symbols of elements ``i0:i1`` (i0 a multiple of 4) into ``sym[0:i1 - i0]``, lane bit
        positions carried in ``pos``; ``ctx[base >> eshift]`` is the offset of the element's
        table in ``dec`` (the sign bit included in the index, so no mask). A table entry is
        ``(symbol << 8) | length``. Returns False as soon as a lane is past its end: each group
        of GROUP symbols per lane reads one 64-bit window (GROUP x MAX_LEN = 55 bits) and starts
        only while every lane is within its own bits, so reads never leave ``words`` (which
        carries two zero words past the last lane: a window read at a lane's very end, bit
        position a multiple of 64, reads the word after next)."""
        mask = np.uint64(TABLE_SIZE - 1)
        sh = np.uint64(eshift)                               # unsigned indices: no wraparound checks
        p0, p1, p2, p3 = pos[0], pos[1], pos[2], pos[3]
        step = GROUP * LANES
        full = i0 + (i1 - i0) // step * step
        for g in range(i0, full, step):
            if p0 > ends[0] or p1 > ends[1] or p2 > ends[2] or p3 > ends[3]:
                return False
            w0, w1, w2, w3 = _window(words, p0), _window(words, p1), _window(words, p2), _window(words, p3)
            c0 = c1 = c2 = c3 = np.uint64(0)
            for r in range(GROUP):
                i = np.uint64(g + r * 4)
                j = np.uint64(g - i0 + r * 4)
                x0 = np.uint64(dec[np.uint64(ctx[np.uint64(base[i]) >> sh]) + (w0 & mask)])
                x1 = np.uint64(dec[np.uint64(ctx[np.uint64(base[i + np.uint64(1)]) >> sh]) + (w1 & mask)])
                x2 = np.uint64(dec[np.uint64(ctx[np.uint64(base[i + np.uint64(2)]) >> sh]) + (w2 & mask)])
                x3 = np.uint64(dec[np.uint64(ctx[np.uint64(base[i + np.uint64(3)]) >> sh]) + (w3 & mask)])
                l0, l1, l2, l3 = x0 & np.uint64(63), x1 & np.uint64(63), x2 & np.uint64(63), x3 & np.uint64(63)
                w0, w1, w2, w3 = w0 >> l0, w1 >> l1, w2 >> l2, w3 >> l3
                c0, c1, c2, c3 = c0 + l0, c1 + l1, c2 + l2, c3 + l3
                sym[j] = x0 >> np.uint64(8)
                sym[j + np.uint64(1)] = x1 >> np.uint64(8)
                sym[j + np.uint64(2)] = x2 >> np.uint64(8)
                sym[j + np.uint64(3)] = x3 >> np.uint64(8)
            p0, p1, p2, p3 = p0 + np.int64(c0), p1 + np.int64(c1), p2 + np.int64(c2), p3 + np.int64(c3)
        pos[0], pos[1], pos[2], pos[3] = p0, p1, p2, p3
        for i in range(full, i1):                                 # the chunk's tail, one at a time
            lane = i & 3
            if pos[lane] > ends[lane]:
                return False
            x = np.uint64(dec[np.uint64(ctx[np.uint64(base[i]) >> sh]) + (_window(words, pos[lane]) & mask)])
            pos[lane] += np.int64(x & np.uint64(0xFF))
            sym[i - i0] = x >> 8
        return True

    @_numba.njit(nogil=True)
    def _escapes_chunk(sym, m, i0, esc_at, ne):
        """Positions (offset ``i0``) of the ESCAPE symbols in ``sym[:m]`` appended to ``esc_at``
        from ``ne`` on (up to its size); returns the new count. Eight symbols at a time: the
        high bit of each byte of ``t`` flags a 0xFF byte (exact for the lowest one; a flagged byte
        above it may be a 0xFE after a borrow, hence the check), and each flag is found by a
        de Bruijn multiply instead of a loop over the eight bytes."""
        ones, highs = np.uint64(0x0101010101010101), np.uint64(0x8080808080808080)
        eights = sym[:m - m % 8].view(np.uint64)
        for q in range(np.uint64(eights.size)):
            v = ~eights[q]
            t = (v - ones) & ~v & highs
            while t:
                lowest = t & (~t + np.uint64(1))
                i = np.uint64(8) * q + np.uint64(_BYTE_OF_BIT[(lowest * _DE_BRUIJN) >> np.uint64(58)])
                if sym[i] == ESCAPE:
                    if ne < esc_at.size:
                        esc_at[ne] = i0 + np.int64(i)
                    ne += 1
                t ^= lowest
        for i in range(m - m % 8, m):
            if sym[i] == ESCAPE:
                if ne < esc_at.size:
                    esc_at[ne] = i0 + i
                ne += 1
        return ne

    @_numba.njit(cache=True, nogil=True)
    def undelta_nb(words, starts, bit_counts, dec, ctx_off, base, eshift, emask, low, kb, esc, bits, out):
        """The target's words into ``out``: per chunk of CHUNK elements (kept in cache), decode the
        symbols from the lanes, find the escapes, apply base + unzigzag((symbol << 8kb) | low),
        then the escaped elements. Returns (ok, escapes found): ok is False when a lane runs
        past or stops short of its recorded bit count (a corrupt payload)."""
        n = base.size
        pos = starts * 64
        ends = pos + bit_counts
        sym = np.empty(CHUNK, np.uint8)
        esc_at = np.empty(CHUNK, np.int64)
        ctx = np.empty(1 << (bits - eshift), np.uint32)          # table offset by base >> eshift, sign included
        for v in range(ctx.size):
            ctx[v] = np.uint32(ctx_off[v & emask])
        found = 0
        for i0 in range(0, n, CHUNK):
            i1 = min(n, i0 + CHUNK)
            if not _lanes_chunk(words, ends, dec, ctx, base, eshift, sym, pos, i0, i1):
                return False, found
            ne = _escapes_chunk(sym, i1 - i0, i0, esc_at, 0)
            if bits == 16 and kb == 0:
                apply16_nb(base[i0:i1], sym[:i1 - i0], out[i0:i1])
            elif bits == 32:
                apply32_nb(base[i0:i1], sym[:i1 - i0], low, kb, out[i0:i1], n, i0)
            else:
                apply_nb(base[i0:i1], sym[:i1 - i0], low, kb, bits, out[i0:i1], n, i0)
            if found + ne <= esc.size:
                fix_escapes_nb(base, low, kb, esc[found:found + ne], esc_at[:ne], bits, out)
            found += ne
        for lane in range(LANES):
            if pos[lane] != ends[lane]:
                return False, found
        return True, found

    @_numba.njit(nogil=True)
    def apply16_nb(base, sym, out):
        """16-bit patterns, k = 0: out = base moved by unzigzag(symbol) ULPs; branch-free, SIMD."""
        for i in range(base.size):
            b = np.int32(base[i])
            s = np.int32(sym[i])
            d = (s >> 1) ^ -(s & 1)
            mb = b ^ (((b >> 15) * 0x7FFF) | 0x8000)
            m = (mb + d) & 0xFFFF
            out[i] = m ^ (((1 - (m >> 15)) * 0x7FFF) | 0x8000)

    @_numba.njit(inline="always")
    def _apply_one(b, z, bits):
        """One word ``b`` (int64) moved by zigzagged ``z`` ULPs at width ``bits``."""
        sign = np.int64(1) << (bits - 1)
        full = (np.int64(1) << bits) - 1
        half = full >> 1
        d = (z >> 1) ^ -(z & 1)
        mb = b ^ (((b >> (bits - 1)) * half) | sign)
        m = (mb + d) & full
        return m ^ (((1 - (m >> (bits - 1))) * half) | sign)

    @_numba.njit(inline="always")
    def _move32(b, h, s):
        """``_apply_one(b, z, 32)`` in uint32 arithmetic (every step truncated to 32 bits, so
        LLVM keeps 8 lanes per AVX2 register), given h = (z >> 1) mod 2^32 and s = z & 1: a
        32-bit difference zigzags to up to 33 bits, and d mod 2^32 needs exactly bits 0-32 of z,
        so z itself is never formed in 32 bits. Unzigzag, to monotonic, add, back."""
        u = np.uint32
        d = u(h ^ u(u(0) - s))
        mb = u(b ^ ((u(u(0) - (b >> u(31))) >> u(1)) | u(0x80000000)))
        m = u(mb + d)
        return u(m ^ ((u(u(m >> u(31)) - u(1)) >> u(1)) | u(0x80000000)))

    @_numba.njit(nogil=True)
    def apply32_nb(base, sym, low, kb, out, n, i0):
        """32-bit patterns: out = base moved by z = (symbol << 8kb) | the kb low planes of
        elements i0 + (0, 1, ...) of a block of ``n`` (plane-major); one branch-free loop per kb
        (0-4), so each vectorises. Escaped elements are fixed afterwards."""
        m = base.size
        u = np.uint32
        if kb == 2:
            lo0, lo1 = low[i0:i0 + m], low[n + i0:n + i0 + m]
            for i in range(m):
                part = (u(lo1[i]) << u(8)) | u(lo0[i])
                out[i] = _move32(base[i], (u(sym[i]) << u(15)) | (part >> u(1)), part & u(1))
        elif kb == 1:
            lo0 = low[i0:i0 + m]
            for i in range(m):
                part = u(lo0[i])
                out[i] = _move32(base[i], (u(sym[i]) << u(7)) | (part >> u(1)), part & u(1))
        elif kb == 0:
            for i in range(m):
                z = np.uint64(sym[i])
                out[i] = _move32(base[i], u(z >> np.uint64(1)), u(z & np.uint64(1)))
        elif kb == 3:
            lo0, lo1, lo2 = low[i0:i0 + m], low[n + i0:n + i0 + m], low[2 * n + i0:2 * n + i0 + m]
            for i in range(m):
                part = (u(lo2[i]) << u(16)) | (u(lo1[i]) << u(8)) | u(lo0[i])
                out[i] = _move32(base[i], (u(sym[i]) << u(23)) | (part >> u(1)), part & u(1))
        else:   # kb == 4: every bit of the difference in the planes, the symbol holds bit 32 of z
            lo0, lo1 = low[i0:i0 + m], low[n + i0:n + i0 + m]
            lo2, lo3 = low[2 * n + i0:2 * n + i0 + m], low[3 * n + i0:3 * n + i0 + m]
            for i in range(m):
                part = (u(lo3[i]) << u(24)) | (u(lo2[i]) << u(16)) | (u(lo1[i]) << u(8)) | u(lo0[i])
                out[i] = _move32(base[i], (u(sym[i]) << u(31)) | (part >> u(1)), part & u(1))

    @_numba.njit(nogil=True)
    def apply_nb(base, sym, low, kb, bits, out, n, i0):
        """Any width: out = base moved by z = (symbol << 8kb) | low planes of elements
        i0 + (0, 1, ...) of a block of ``n`` (plane-major planes); escaped elements are fixed
        afterwards."""
        for i in range(base.size):
            z = np.int64(sym[i]) << (8 * kb)
            for j in range(kb):
                z |= np.int64(low[j * n + i0 + i]) << (8 * j)
            out[i] = _apply_one(np.int64(base[i]), z, bits)

    @_numba.njit(nogil=True)
    def fix_escapes_nb(base, low, kb, esc, esc_at, bits, out):
        """The escaped elements: z = (escape value << 8kb) | low planes."""
        n = base.size
        for t in range(esc_at.size):
            i = esc_at[t]
            z = np.int64(esc[t]) << (8 * kb)
            for j in range(kb):
                z |= np.int64(low[j * n + i]) << (8 * j)
            out[i] = _apply_one(np.int64(base[i]), z, bits)

    @_numba.njit(cache=True, nogil=True)
    def parse_tables_nb(section, emask, max_tables, reversed_bits):
        """The table section (see exact_huff) as (table offset per exponent uint64[emask + 1],
        decode tables uint16[T * TABLE_SIZE], status): status 0 ok, 1 truncated or malformed,
        2 code lengths that are not a complete prefix code. Same checks as exact_huff.parse_tables."""
        size = section.size
        offsets = np.zeros(emask + 1, np.uint64)
        if size < 1:
            return offsets, np.zeros(0, np.uint16), 1
        n_own = np.int64(section[0])
        if n_own >= max_tables or size < 1 + n_own:
            return offsets, np.zeros(0, np.uint16), 1
        dec = np.empty((n_own + 1) * TABLE_SIZE, np.uint16)
        for e in range(emask + 1):
            offsets[e] = np.uint64(n_own * TABLE_SIZE)
        for t in range(n_own):
            e = np.int64(section[1 + t])
            if e > emask or offsets[e] != np.uint64(n_own * TABLE_SIZE):
                return offsets, dec, 1
            offsets[e] = np.uint64(t * TABLE_SIZE)
        at = 1 + n_own
        lengths = np.zeros(256, np.int64)
        for t in range(n_own + 1):
            if at + 2 > size:
                return offsets, dec, 1
            m = np.int64(section[at]) | (np.int64(section[at + 1]) << 8)
            at += 2
            table = dec[t * TABLE_SIZE:(t + 1) * TABLE_SIZE]
            if m == 0:
                if at + 1 > size:
                    return offsets, dec, 1
                table[:] = np.uint16(np.int64(section[at]) << 8)
                at += 1
                continue
            if m > 256 or at + (m + 1) // 2 > size:
                return offsets, dec, 1
            kraft = 0
            counts = np.zeros(MAX_LEN + 2, np.int64)
            for s in range(m):
                byte = np.int64(section[at + s // 2])
                length = (byte >> (4 * (s & 1))) & 0xF
                if length > MAX_LEN:
                    return offsets, dec, 2
                lengths[s] = length
                counts[length] += 1
                if length:
                    kraft += 1 << (MAX_LEN - length)
            at += (m + 1) // 2
            if kraft != TABLE_SIZE:
                return offsets, dec, 2
            left = np.zeros(MAX_LEN + 2, np.int64)          # canonical: (length, symbol) order
            for length in range(1, MAX_LEN + 1):
                left[length + 1] = left[length] + (counts[length] << (MAX_LEN - length))
            for s in range(m):                              # symbols ascending: each takes the next code
                length = lengths[s]
                if length:
                    span = 1 << (MAX_LEN - length)
                    entry = np.uint16((s << 8) | length)
                    for v in range(left[length], left[length] + span):
                        table[reversed_bits[v]] = entry
                    left[length] += span
        if at != size:
            return offsets, dec, 1
        return offsets, dec, 0
