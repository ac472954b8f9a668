"""Exact delta format 2 (issue 11): per-exponent Huffman lanes. Bit-exact round trips for random bit
patterns under any blocking, both kernel paths writing the same bytes, format 1 still read, the
coded size checked against the code lengths it claims, and corrupt payloads refused without a crash."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorstore_llm.diff import exact, exact_huff, exact_lanes
from tensorstore_llm.errors import CodecError

FMTS = {"bfloat16": (torch.bfloat16, 16), "float16": (torch.float16, 16), "float32": (torch.float32, 32)}
PATHS = [True, False] if exact._numba is not None else [False]
SPECIALS16 = [0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x03FF, 0x7F80, 0xFF80, 0x7C00, 0xFC00, 0x7FC0,
              0xFFC1, 0x7E00, 0x7F81, 0x7FFF, 0xFFFF, 0x7F7F, 0xFF7F, 0x7BFF, 0x0400]
SPECIALS32 = [0, 0x80000000, 1, 0x80000001, 0x007FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001,
              0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x00800000]


def _tensor(words: np.ndarray, fmt: str, shape) -> torch.Tensor:
    dtype, bits = FMTS[fmt]
    return torch.from_numpy(words.view(np.int16 if bits == 16 else np.int32).copy()).view(dtype).reshape(shape)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _pair(fmt: str, n: int, seed: int, mix: str):
    """Base and target bit patterns: a fine-tune-like move of a few ULPs, specials (NaN, inf, -0,
    subnormals, extremes), unrelated random words, unchanged elements, in a mixture."""
    bits = FMTS[fmt][1]
    word = np.uint16 if bits == 16 else np.uint32
    rng = np.random.default_rng(seed)
    specials = np.array(SPECIALS16 if bits == 16 else SPECIALS32, word)
    if mix == "weights":
        base = (rng.standard_normal(n) * 0.05).astype(np.float32)
        b = _tensor(base.view(np.uint32), "float32", (n,)).to(FMTS[fmt][0])
        b = _bits(b).numpy().view(word)
    else:
        b = rng.integers(0, 1 << bits, n, dtype=np.uint64).astype(word)
        b = np.where(rng.random(n) < 0.3, specials[rng.integers(0, specials.size, n)], b)
    m = exact._mono(b, bits).astype(np.int64)
    moves = np.round(rng.standard_normal(n) * rng.choice([0.5, 2, 30, 3000], n)).astype(np.int64)
    t = exact._unmono(((m + moves) & ((1 << bits) - 1)).astype(word), bits)
    pick = rng.random(n)
    t = np.where(pick < 0.2, b, t)                                               # unchanged
    t = np.where((pick > 0.9) & (pick < 0.95), rng.integers(0, 1 << bits, n, dtype=np.uint64).astype(word), t)
    t = np.where(pick >= 0.95, specials[rng.integers(0, specials.size, n)], t)   # to NaN / inf / -0 ...
    return b, t


def _check(base, target, fmt, **kw):
    """Both kernel paths: same bytes; every decoder (both paths) gives the target's exact bits."""
    blobs = [exact.encode_delta(base, target, fmt, use_numba=p, **kw) for p in PATHS]
    assert all(x == blobs[0] for x in blobs)
    for p in PATHS:
        out = exact.decode_delta(base, blobs[0], use_numba=p)
        if isinstance(target, torch.Tensor):
            assert out.dtype == target.dtype and out.shape == target.shape
            assert torch.equal(_bits(out), _bits(target))
        else:
            assert np.array_equal(out, target)
    return blobs[0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(sorted(FMTS)), rows=st.integers(1, 40), cols=st.integers(1, 70),
       seed=st.integers(0, 2**32 - 1), mix=st.sampled_from(["weights", "random"]))
def test_random_bit_patterns_round_trip_bit_for_bit(fmt, rows, cols, seed, mix):
    b, t = _pair(fmt, rows * cols, seed, mix)
    base, target = _tensor(b, fmt, (rows, cols)), _tensor(t, fmt, (rows, cols))
    data = _check(base, target, fmt)
    assert data[4] == exact_huff.VERSION
    assert np.array_equal(exact.decode_delta(b, data), t)                        # NumPy words in, words out


@pytest.mark.parametrize("fmt", sorted(FMTS))
def test_any_blocking_rebuilds_the_tensor(fmt):
    b, t = _pair(fmt, 600 * 37, seed=7, mix="weights")
    base, target = _tensor(b, fmt, (600, 37)), _tensor(t, fmt, (600, 37))
    rng = np.random.default_rng(1)
    for _ in range(3):
        cuts = np.unique(np.concatenate([[0, 600], rng.integers(1, 600, rng.integers(1, 9))]))
        parts = [exact.decode_delta(base[a:z], exact.encode_delta(base[a:z], target[a:z], fmt))
                 for a, z in itertools.pairwise(cuts)]
        assert torch.equal(_bits(torch.cat(parts)), _bits(target))


@pytest.mark.parametrize("n", [1, 2, 3, 15, 16, 17, 31, 33, 100, 16 * 1024 + 5, 3 * 16 * 1024])
def test_lane_tails_and_chunk_edges(n):
    b, t = _pair("bfloat16", n, seed=n, mix="weights")
    _check(b, t, "bfloat16")


@pytest.mark.parametrize("fmt", sorted(FMTS))
def test_format_1_payloads_still_decode(fmt):
    b, t = _pair(fmt, 3000, seed=3, mix="weights")
    base, target = _tensor(b, fmt, (60, 50)), _tensor(t, fmt, (60, 50))
    v1 = _check(base, target, fmt, version=1)
    assert v1[4] == 1
    identical = exact.encode_delta(base, base.clone(), fmt, version=1)
    assert len(identical) == exact.header_size(1)
    assert torch.equal(_bits(exact.decode_delta(base, identical)), _bits(base))


def test_one_symbol_per_context_costs_no_lane_bits():
    """Every weight moved by exactly +1 ULP: each table has one symbol, coded in zero bits."""
    b, _ = _pair("bfloat16", 5000, seed=4, mix="weights")
    b = b[(b & 0x7F80) != 0x7F80]                                               # no NaN / inf at the edge
    t = exact._unmono((exact._mono(b, 16).astype(np.int64) + 1).astype(np.uint16), 16)
    data = _check(b, t, "bfloat16")
    fields = exact_huff.parse_v2(data)
    assert list(fields[8]) == [0] * exact_lanes.LANES and len(data) < exact.header_size() + 100


def test_lane_bits_are_the_sum_of_the_code_lengths():
    """The coded size equals what the tables say: sum over elements of the length of the code of
    min(zigzag(ULP difference), 255) in the table of the base's exponent (computed here with NumPy)."""
    b, t = _pair("bfloat16", 20000, seed=5, mix="weights")
    data = exact.encode_delta(b, t, "bfloat16")
    fields = exact_huff.parse_v2(data)
    sym = np.minimum(exact._zigzag_np(b, t, 16), 255).astype(np.int64)
    exps = ((b >> 7) & 0xFF).astype(np.int64)
    hist = np.bincount(exps * 256 + sym, minlength=256 * 256)
    table_of, lengths, _, section = exact_huff.build_tables(hist, 0xFF)
    assert section == fields[5]
    assert int(fields[8].sum()) == int(lengths[table_of[exps], sym].astype(np.int64).sum())
    # and per context it is within 5% of that context's order-0 entropy
    h = 0.0
    for e in np.unique(exps):
        p = np.bincount(sym[exps == e]) / np.count_nonzero(exps == e)
        p = p[p > 0]
        h -= np.count_nonzero(exps == e) * float((p * np.log2(p)).sum())
    assert h <= int(fields[8].sum()) <= 1.05 * h + 64 * 2


def test_code_lengths_are_limited_and_complete():
    freq = np.zeros(256, np.int64)
    freq[:60] = [int(1.6 ** i) + 1 for i in range(60)]                          # would need ~50-bit codes
    lengths = exact_huff.code_lengths(freq)
    assert lengths.max() <= exact_lanes.MAX_LEN and np.count_nonzero(lengths) == 60
    assert sum(2.0 ** -int(x) for x in lengths if x) == 1.0
    rng = np.random.default_rng(6)                                               # and such data round-trips
    b = np.full(40000, 0x3C00, np.uint16)
    z = np.minimum(rng.geometric(0.35, b.size) - 1, 300)
    d = np.where(z & 1, -(z >> 1) - 1, z >> 1)
    t = exact._unmono(((exact._mono(b, 16).astype(np.int64) + d) & 0xFFFF).astype(np.uint16), 16)
    _check(b, t, "bfloat16")


def test_unchanged_rows_are_not_coded():
    b, t = _pair("float32", 512 * 64, seed=8, mix="weights")
    base, target = _tensor(b, "float32", (512, 64)), _tensor(t, "float32", (512, 64))
    mixed = target.clone()
    mixed[100:400] = base[100:400]
    full, part = _check(base, target, "float32"), _check(base, mixed, "float32")
    assert part[7] & exact_huff.FLAG_ROWS and len(part) < 0.5 * len(full)


@pytest.mark.parametrize("path", PATHS)
def test_corrupt_payloads_are_refused_or_caught_never_a_crash(path):
    """Random byte flips and truncations: a CodecError, or a (wrong) result of the right size that
    the store's per-block checksum rejects; the decoder never reads or writes out of bounds."""
    b, t = _pair("bfloat16", 4000 if path else 600, seed=9, mix="weights")
    data = exact.encode_delta(b, t, "bfloat16")
    rng = np.random.default_rng(10)
    refused = 0
    for trial in range(300 if path else 40):
        bad = bytearray(data)
        if trial % 5 == 0:
            bad = bad[:rng.integers(0, len(bad))]
        for at in rng.integers(0, len(bad), rng.integers(1, 4)) if len(bad) else []:
            bad[at] ^= int(rng.integers(1, 256))
        try:
            out = exact.decode_delta(b, bytes(bad), use_numba=path)
        except CodecError:
            refused += 1
            continue
        assert out.shape == b.shape
    assert refused > 0


def test_more_escapes_in_the_lanes_than_the_header_says_is_an_error():
    b, t = _pair("bfloat16", 3000, seed=11, mix="random")
    data = exact.encode_delta(b, t, "bfloat16")
    n_esc = exact_huff.parse_v2(data)[4]
    esc = exact._zigzag_np(b, t, 16)
    esc = esc[esc >= 255].astype(np.uint16)
    assert n_esc == esc.size > 1
    head = list(exact_huff.HEADER.unpack_from(data))
    old_blob = data[len(data) - head[9]:]
    new_blob = exact._compressor(None).compress(esc[:-1].tobytes())
    head[6], head[9] = n_esc - 1, len(new_blob)
    forged = exact_huff.HEADER.pack(*head) + data[exact_huff.HEADER.size:len(data) - len(old_blob)] + new_blob
    for p in PATHS:
        with pytest.raises(CodecError, match="escapes"):
            exact.decode_delta(b, forged, use_numba=p)


def test_an_incomplete_prefix_code_is_refused():
    lengths = np.zeros(256, np.uint8)
    lengths[:3] = [1, 2, 3]                                                      # Kraft sum 7/8
    with pytest.raises(CodecError, match="prefix code"):
        exact_huff.decode_table(lengths, 0, "test")
    b, t = _pair("bfloat16", 2000, seed=12, mix="weights")
    data = bytearray(exact.encode_delta(b, t, "bfloat16"))
    section_at = exact_huff.HEADER.size
    n_own = data[section_at]
    first_lengths = section_at + 1 + n_own + 2                                   # first table's nibbles
    data[first_lengths] = (data[first_lengths] & 0xF0) | 0x1                     # one code made 1 bit long
    for p in PATHS:
        with pytest.raises(CodecError):
            exact.decode_delta(b, bytes(data), use_numba=p)


@pytest.mark.parametrize("scale", [0, 3, 2**11, 2**19, 2**27])
def test_fp32_every_low_plane_count_round_trips(scale):
    """fp32 moved by ~``scale`` ULPs: the block's k (low byte planes, chosen from the typical move)
    is 0, 8, 16 or 24, each with its own vectorised apply loop (exact_lanes.apply32_nb); the
    elements straddle three decode chunks, and 2% are escapes or specials."""
    rng = np.random.default_rng(13)
    n = 2 * exact_lanes.CHUNK + 123
    b, _ = _pair("float32", n, seed=14, mix="weights")
    b[::50] = np.array(SPECIALS32, np.uint32)[rng.integers(0, len(SPECIALS32), b[::50].size)]
    moves = np.round(rng.standard_normal(n) * scale).astype(np.int64) if scale else rng.integers(-1, 2, n)
    moves[::49] = rng.integers(-(1 << 31), 1 << 31, moves[::49].size)         # escapes at any k
    t = exact._unmono(((exact._mono(b, 32).astype(np.int64) + moves) & 0xFFFFFFFF).astype(np.uint32), 32)
    data = _check(b, t, "float32")
    assert exact_huff.parse_v2(data)[1] == {0: 0, 3: 0, 2**11: 8, 2**19: 16, 2**27: 24}[scale]


@pytest.mark.skipif(exact._numba is None, reason="numba kernels")
@pytest.mark.parametrize("kb", [0, 1, 2, 3, 4])
def test_apply32_equals_the_numpy_formula(kb):
    """The uint32 apply kernel against exact_ref.apply_np (int64 NumPy) on random words, every
    symbol and random low planes, over a chunk at an offset inside a larger block."""
    from tensorstore_llm.diff import exact_ref

    rng = np.random.default_rng(15 + kb)
    n, i0, m = 9000, 1234, 5000
    base = rng.integers(0, 1 << 32, m, dtype=np.uint64).astype(np.uint32)
    base[:len(SPECIALS32)] = SPECIALS32
    sym = rng.integers(0, 256, m).astype(np.uint8)
    low = rng.integers(0, 256, n * kb).astype(np.uint8)
    out = np.empty(m, np.uint32)
    exact_lanes.apply32_nb(base, sym, low, kb, out, n, i0)
    z = sym.astype(np.uint64) << np.uint64(8 * kb)
    for j in range(kb):
        z |= low[j * n + i0:j * n + i0 + m].astype(np.uint64) << np.uint64(8 * j)
    assert np.array_equal(out, exact_ref.apply_np(base, z, 32, np.uint32))


def test_fp32_unrelated_words_use_all_four_planes_and_round_trip():
    """Targets unrelated to their base (random words: up to 33-bit zigzagged differences), where
    the encoder may keep all 32 low bits in planes (k = 32, as for the counterexample below);
    every decoder gives the exact bits (the uint32 apply loop once read only three of the four
    planes)."""
    rng = np.random.default_rng(17)
    for n in (1, 7, exact_lanes.CHUNK + 5):
        b = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
        t = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
        _check(b, t, "float32")
    data = _check(torch.tensor([[-3.4028e38]]), torch.tensor([[-3.7607e-20]]), "float32")   # hypothesis's counterexample
    assert exact_huff.parse_v2(data)[1] == 32


@pytest.mark.skipif(exact._numba is None, reason="numba kernels")
def test_escape_scan_finds_exactly_the_escapes():
    """The word-at-a-time escape scan against np.flatnonzero: escapes next to 0xFE bytes (the
    borrow trick's false flags), runs of escapes, every byte position, a tail of m % 8."""
    rng = np.random.default_rng(16)
    for density in (0.0, 0.01, 0.2, 0.9):
        m = 8 * 997 + 5
        sym = rng.choice(np.array([0, 1, 7, 254, 255], np.uint8), m, p=[0.5, 0.2, 0.1, 0.2 - density * 0.2,
                                                                          density * 0.2])
        sym[rng.random(m) < density] = 255
        esc_at = np.empty(m, np.int64)
        found = exact_lanes._escapes_chunk(sym, m, 1000, esc_at, 3)
        want = np.flatnonzero(sym == 255) + 1000
        assert found == 3 + want.size and np.array_equal(esc_at[3:found], want)
