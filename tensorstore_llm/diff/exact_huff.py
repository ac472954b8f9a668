"""Exact delta, format 2: ULP differences in element order, Huffman-coded with one table per exponent
of the base weight.

The symbols are those of format 1 (:mod:`.exact`): ``min(zigzag(ULP difference) >> k, 255)``,
255 escaping the larger values into a side stream, ``k`` low bits as byte planes for fp32. The
distribution of a symbol depends strongly on its base weight's exponent (AdamW moves weights by
about the same amount whatever their size; real SmolLM2 fine-tune: 3.86 bits of order-0 entropy
per weight, 3.16 conditioned on the exponent). Format 1 reached that conditional distribution by
sorting the symbols by exponent and letting zstd's per-block Huffman see one exponent at a time;
the sort's inverse, a gather, was most of its decode time. Format 2 codes the symbols where they
are, each with the canonical Huffman code of its own exponent (the context), so decoding is one
pass over the block (:mod:`.exact_lanes`): no permutation, no histogram, no zstd.

Block layout (all little-endian)::

    header  HEADER: magic, version 2, dtype code, k, flags, n, escapes,
            table section bytes, low planes bytes, escapes bytes, LANES lane bit counts
    tables  u8 T-1 (exponents with their own table), those T-1 exponents, then T code tables
            (the T-th for every other exponent): u16 m, then m code lengths as nibbles, or
            m = 0 and one byte: the only symbol, coded in zero bits
    lanes   LANES bit lanes, each a whole number of u64 words (see exact_lanes)
    low     zstd frame of the k/8 low byte planes (plane-major, element order), if k > 0
    escapes zstd frame of the escaped values (z >> k, element order), if any

Code lengths are limited to 11 bits (frequencies halved until Huffman fits, deterministic), so a
decode table has 2,048 entries.
"""
from __future__ import annotations

import struct

import numpy as np

from ..errors import CodecError
from . import exact_lanes as lanes
from . import exact_ref
from .exact_lanes import ESCAPE, LANES, MAX_LEN, TABLE_SIZE

VERSION = 2
FLAG_ROWS = 2              # (FLAG_IDENTICAL = 1 is the whole block) a bitmap of the changed rows leads the tables
HEADER = struct.Struct("<4sBBBBQQQQQ" + "Q" * LANES)
MAX_TABLES = 32            # contexts with a table of their own, + 1 shared by every other exponent
MIN_OWN = 1024             # elements an exponent needs in a block to get its own table


# --- code construction (plain Python: a few hundred symbols per table) -------------------------------

def code_lengths(freq: np.ndarray) -> np.ndarray:
    """Huffman code lengths (uint8[256], 0 = symbol absent) of ``freq``, at most MAX_LEN bits:
    frequencies are halved (keeping them >= 1) until the code fits. A single used symbol gets
    length 0 (it costs no bits). Deterministic: leaves sorted by (frequency, symbol), ties
    between a leaf and an inner node go to the leaf; numba and Python run the same code."""
    symbols = np.flatnonzero(freq)
    lengths = np.zeros(256, np.uint8)
    if symbols.size <= 1:
        return lengths
    weights = freq[symbols].astype(np.int64)
    depths = _depths_fast(np.ascontiguousarray(symbols), weights)
    lengths[symbols] = depths
    return lengths


def _depths(symbols, weights):
    """Huffman depths of ``symbols`` (ascending) with ``weights`` > 0, limited to MAX_LEN by halving."""
    m = symbols.size
    while True:
        order = np.argsort(weights * 512 + symbols)            # (weight, symbol), both exact in int64
        wt = np.zeros(2 * m - 1, np.int64)
        wt[:m] = weights[order]
        parent = np.zeros(2 * m - 1, np.int64)
        leaf, inner = 0, m                                     # two-queue Huffman: inner nodes come sorted
        for node in range(m, 2 * m - 1):
            for _ in range(2):
                if leaf < m and (inner >= node or wt[leaf] <= wt[inner]):
                    x = leaf
                    leaf += 1
                else:
                    x = inner
                    inner += 1
                parent[x] = node
                wt[node] += wt[x]
        depth = np.zeros(2 * m - 1, np.int64)
        for x in range(2 * m - 3, -1, -1):
            depth[x] = depth[parent[x]] + 1
        if depth[:m].max() <= MAX_LEN:
            out = np.zeros(m, np.int64)
            out[order] = depth[:m]
            return out
        weights = np.maximum(1, weights >> 1)


_depths_fast = lanes._numba.njit(cache=True)(_depths) if lanes._numba is not None else _depths


_REVERSED = np.array([int(format(x, f"0{MAX_LEN}b")[::-1], 2) for x in range(TABLE_SIZE)], np.int64)


def _left_aligned(lengths: np.ndarray):
    """(symbols in canonical order, their lengths, their codes left-aligned to MAX_LEN bits): a
    canonical code is the running sum of 2**(MAX_LEN - length) in (length, symbol) order."""
    symbols = np.flatnonzero(lengths)
    order = symbols[np.lexsort((symbols, lengths[symbols]))]
    ls = lengths[order].astype(np.int64)
    span = np.left_shift(1, MAX_LEN - ls)
    return order, ls, np.cumsum(span) - span


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes (uint64[256]) for ``lengths``, bit-reversed for an LSB-first stream."""
    codes = np.zeros(256, np.uint64)
    order, _, left = _left_aligned(lengths)
    codes[order] = _REVERSED[left]                # reversing MAX_LEN bits puts the code low
    return codes


def decode_table(lengths: np.ndarray, only: int, where: str) -> np.ndarray:
    """The 2**MAX_LEN-entry table ``(symbol << 8) | length`` for the next MAX_LEN bits of a lane;
    CodecError unless the lengths make a complete prefix code."""
    if not lengths.any():
        return np.full(TABLE_SIZE, only << 8, np.uint16)
    order, ls, left = _left_aligned(lengths)
    if ls[-1] > MAX_LEN or int(np.left_shift(1, MAX_LEN - ls).sum()) != TABLE_SIZE:
        raise CodecError(f"exact delta: {where}: code lengths do not form a complete prefix code")
    which = np.searchsorted(left, _REVERSED, side="right") - 1     # the code each bit pattern starts with
    return ((order[which] << 8) | ls[which]).astype(np.uint16)


# --- the table section ---------------------------------------------------------------------------------

def choose_contexts(hist: np.ndarray, emask: int) -> np.ndarray:
    """Exponents with a table of their own: the most frequent ones with at least MIN_OWN
    elements, up to MAX_TABLES - 1, in order of exponent."""
    counts = hist.reshape(emask + 1, 256).sum(axis=1)
    ranked = sorted((e for e in range(emask + 1) if counts[e] >= MIN_OWN), key=lambda e: (-counts[e], e))
    return np.array(sorted(ranked[:MAX_TABLES - 1]), np.int64)


def build_tables(hist: np.ndarray, emask: int):
    """(table id per exponent uint8[emask + 1], lengths uint8[T, 256], only-symbol per table,
    table section bytes) for a block's (exponent, symbol) histogram."""
    hist = hist.reshape(emask + 1, 256)
    own = choose_contexts(hist, emask)
    table_of = np.full(emask + 1, own.size, np.uint8)
    table_of[own] = np.arange(own.size, dtype=np.uint8)
    freqs = [hist[e] for e in own] + [hist.sum(axis=0) - (hist[own].sum(axis=0) if own.size else 0)]
    lengths = np.stack([code_lengths(f) for f in freqs])
    only = [int(np.argmax(f)) if f.any() else 0 for f in freqs]
    parts = [bytes([own.size]), own.astype(np.uint8).tobytes()]
    for ls, s in zip(lengths, only):
        m = int(np.flatnonzero(ls)[-1]) + 1 if ls.any() else 0
        parts.append(struct.pack("<H", m))
        if m:
            nib = np.zeros(m + (m & 1), np.uint8)
            nib[:m] = ls[:m]
            parts.append((nib[0::2] | (nib[1::2] << 4)).tobytes())
        else:
            parts.append(bytes([s]))
    return table_of, lengths, only, b"".join(parts)


def parse_tables(section: bytes, emask: int):
    """(table id per exponent, decode tables flat uint16[T * TABLE_SIZE]) from a table section."""
    try:
        n_own = section[0]
        own = np.frombuffer(section, np.uint8, n_own, 1).astype(np.int64)
        at = 1 + n_own
        tables = []
        for t in range(n_own + 1):
            (m,) = struct.unpack_from("<H", section, at)
            at += 2
            if m > 256:
                raise CodecError(f"exact delta: table {t} lists {m} symbols")
            if m:
                nib = np.frombuffer(section, np.uint8, (m + 1) // 2, at)
                at += (m + 1) // 2
                ls = np.zeros(256, np.uint8)
                ls[:m] = np.stack([nib & 0xF, nib >> 4], axis=1).reshape(-1)[:m]
                tables.append(decode_table(ls, 0, f"table {t}"))
            else:
                tables.append(decode_table(np.zeros(256, np.uint8), section[at], f"table {t}"))
                at += 1
    except (IndexError, ValueError, struct.error):
        raise CodecError("exact delta: the code table section is truncated") from None
    if at != len(section) or n_own >= MAX_TABLES or (own > emask).any() or np.unique(own).size != own.size:
        raise CodecError("exact delta: the code table section is malformed")
    table_of = np.full(emask + 1, n_own, np.int64)
    table_of[own] = np.arange(n_own)
    return table_of, np.concatenate(tables)


# --- format 2 encode / decode ---------------------------------------------------------------------------

def encode_v2(b, t, code, bits, eshift, emask, k, word, compress, use_numba: bool, rows: int = 1) -> bytes:
    """Format-2 bytes of target words ``t`` against base words ``b`` (not identical), ``k`` low
    bits as byte planes; ``compress`` frames the side streams (low planes, escapes). With
    ``rows`` > 1, rows left unchanged (at least 1/16 of the block) are listed in a bitmap and
    not coded at all: a Huffman code spends at least one bit on every element it codes."""
    n, flags, prefix = b.size, 0, b""
    if rows > 1 and n % rows == 0:
        changed = (b.reshape(rows, -1) != t.reshape(rows, -1)).any(axis=1)
        if (rows - int(changed.sum())) * 16 >= rows:
            flags, prefix = FLAG_ROWS, struct.pack("<Q", rows) + np.packbits(changed, bitorder="little").tobytes()
            b, t = b.reshape(rows, -1)[changed].reshape(-1), t.reshape(rows, -1)[changed].reshape(-1)
    section, words, bit_counts, low, esc = _encode_core(b, t, bits, eshift, emask, k, word, use_numba)
    low_blob = compress(low.tobytes()) if low.size else b""
    esc_blob = compress(esc.tobytes()) if esc.size else b""
    head = HEADER.pack(b"TSDX", VERSION, code, k, flags, n, esc.size, len(prefix + section),
                       len(low_blob), len(esc_blob), *(int(c) for c in bit_counts))
    return head + prefix + section + words.astype("<u8").tobytes() + low_blob + esc_blob


def _encode_core(b, t, bits, eshift, emask, k, word, use_numba):
    n = b.size
    fast = use_numba and lanes._numba is not None
    if fast:
        sym = np.empty(n, np.uint8)
        hist = np.zeros((emask + 1) * 256, np.int64)
        if bits == 16 and k == 0:
            low = np.empty(0, np.uint8)
            esc = lanes.symbols16_nb(b, t, eshift, emask, sym, hist)
        else:
            low = np.empty(n * (k // 8), np.uint8)
            esc = lanes.symbols_nb(b, t, bits, k, eshift, emask, sym, low, hist)
        esc = esc.astype(word)
    else:
        sym, low, esc = exact_ref.symbols_np(b, t, bits, k, word)
        exps = ((b >> eshift) & emask).astype(np.int64)
        hist = np.bincount(exps * 256 + sym, minlength=(emask + 1) * 256)
    table_of, lengths, _, section = build_tables(hist, emask)
    codes = np.concatenate([canonical_codes(ls) for ls in lengths])
    flat_lengths = lengths.reshape(-1)
    if fast:
        words, _, bit_counts = lanes.pack_nb(sym, b, eshift, emask, table_of, codes, flat_lengths)
    else:
        words, _, bit_counts = exact_ref.pack_np(sym, table_of[(b >> eshift) & emask], codes, flat_lengths)
    return section, words, bit_counts, low, esc


def identical_header(code: int, n: int, flag: int) -> bytes:
    """The whole payload of a block whose target equals its base: a header with ``flag`` set."""
    return HEADER.pack(b"TSDX", VERSION, code, 0, flag, n, 0, 0, 0, 0, *[0] * LANES)


def parse_v2(data: bytes):
    """(dtype code, k, flags, n, escapes, table section, lane words with two zero words appended,
    lane starts, lane bit counts, low blob, escape blob); CodecError on inconsistent sizes. The
    section and the blobs are memoryviews of ``data`` (no copies)."""
    if len(data) < HEADER.size:
        raise CodecError(f"exact delta: {len(data)} bytes is shorter than the format-2 header")
    _, _, code, k, flags, n, n_esc, n_tab, n_low, n_esc_blob, *bit_counts = HEADER.unpack_from(data)
    lane_words = [-(-c // 64) for c in bit_counts]
    total = HEADER.size + n_tab + 8 * sum(lane_words) + n_low + n_esc_blob
    if total != len(data):
        raise CodecError(f"exact delta: header promises {total} bytes, got {len(data)}")
    view = memoryview(data)                               # slices of it copy nothing
    at = HEADER.size
    section = view[at:at + n_tab]
    at += n_tab
    n_words = sum(lane_words)
    words = np.empty(n_words + 2, np.uint64)              # two zero words: a window at a lane's end stays inside
    words[:n_words] = np.frombuffer(data, "<u8", n_words, at)
    words[n_words:] = 0
    at += 8 * n_words
    starts = np.cumsum([0] + lane_words)[:-1].astype(np.int64)
    low_blob, esc_blob = view[at:at + n_low], view[at + n_low:]
    return code, k, flags, n, n_esc, section, words, starts, np.array(bit_counts, np.int64), low_blob, esc_blob


def _row_map(section: bytes, n: int):
    """(changed-rows bool array, the rest of the section) from a FLAG_ROWS table section."""
    if len(section) < 8:
        raise CodecError("exact delta: the row map is truncated")
    (rows,) = struct.unpack_from("<Q", section)
    nbytes = -(-rows // 8)
    if rows < 2 or n % rows or len(section) < 8 + nbytes:
        raise CodecError(f"exact delta: a row map of {rows} rows does not fit a block of {n} elements")
    changed = np.unpackbits(np.frombuffer(section, np.uint8, nbytes, 8), count=rows, bitorder="little").astype(bool)
    return changed, section[8 + nbytes:]


def decode_v2(b, parsed, bits, eshift, emask, word, decompress, use_numba: bool) -> np.ndarray:
    """Target words from base words ``b`` and :func:`parse_v2`'s fields; CodecError when the
    payload is inconsistent (a lane that does not end at its recorded length, escape counts)."""
    _, k, flags, n, n_esc, section, words, starts, bit_counts, low_blob, esc_blob = parsed
    if flags & FLAG_ROWS:
        changed, section = _row_map(section, n)
        rows = changed.size
        core = decode_v2(b.reshape(rows, -1)[changed].reshape(-1), (None, k, 0, int(changed.sum()) * (n // rows), n_esc,
                         section, words, starts, bit_counts, low_blob, esc_blob), bits, eshift, emask, word, decompress,
                         use_numba)
        out = b.copy()
        out.reshape(rows, -1)[changed] = core.reshape(-1, n // rows)
        return out
    kb = k // 8
    fast = use_numba and lanes._numba is not None
    if fast:
        ctx_off, dec, status = lanes.parse_tables_nb(np.frombuffer(section, np.uint8), emask, MAX_TABLES, _REVERSED)
        if status:
            raise CodecError("exact delta: the code table section is " +
                             ("malformed" if status == 1 else "not a complete prefix code"))
    else:
        table_of, dec = parse_tables(section, emask)
        ctx_off = (table_of * TABLE_SIZE).astype(np.uint64)
    low = decompress(low_blob, n * kb, np.uint8) if kb else np.empty(0, np.uint8)
    esc = decompress(esc_blob, n_esc, word) if n_esc else np.empty(0, word)
    if low.size != n * kb or esc.size != n_esc:
        raise CodecError("exact delta: side stream sizes do not match the header")
    if fast:
        out = np.empty(n, word)
        ok, found = lanes.undelta_nb(words, starts, bit_counts, dec, ctx_off, b, eshift, emask, low, kb, esc, bits, out)
        if not ok:
            raise CodecError("exact delta: corrupt payload (a bit lane does not end where its header says)")
        if found != n_esc:
            raise CodecError(f"exact delta: {found} escapes in the payload, header says {n_esc}")
        return out
    exps = ((b >> eshift) & emask).astype(np.int64)
    sym = exact_ref.decode_py(words, starts, bit_counts, dec, ctx_off, exps, n)
    if sym is None:
        raise CodecError("exact delta: corrupt payload (a bit lane does not end where its header says)")
    is_esc = sym == ESCAPE
    if int(is_esc.sum()) != n_esc:
        raise CodecError(f"exact delta: {int(is_esc.sum())} escapes in the payload, header says {n_esc}")
    high = sym.astype(np.uint64)
    high[is_esc] = esc.astype(np.uint64)
    z = high << np.uint64(k)
    for j in range(kb):
        z |= low[j * n:(j + 1) * n].astype(np.uint64) << np.uint64(8 * j)
    return exact_ref.apply_np(b, z, bits, word)
