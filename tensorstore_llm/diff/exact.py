"""Exact delta coding of a fine-tuned block against its base block: bit for bit, any bit pattern.

The scheme (measured on a real SmolLM2 fine-tune in docs/benchmarks.md, "Delta codecs"):

1. Map every bit pattern to an unsigned integer that is monotonic in the float's value
   (positive: set the sign bit; negative: invert all bits). NaN, inf, -0.0 and subnormals are
   just integers too, so nothing is special-cased and every pattern round-trips.
2. The delta is the wrapped difference of the two integers, the **ULP difference**: for a
   fine-tune it is tiny (a few units in the last place), while the XOR of the two patterns
   smears one-ULP changes over many mantissa bits whenever a carry ripples.
3. Zigzag it (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...). ``k`` low bits (a multiple of 8, chosen per
   block: 0 for bf16 fine-tunes, ~16 for fp32) go to byte planes; the high part becomes one byte
   symbol, 255 escaping rarer large values into a separate stream (element order).
4. The symbols are entropy-coded **conditioned on the base weight's exponent**, which the decoder
   knows: AdamW moves weights by about the same amount whatever their size, so the delta in ULPs
   depends strongly on the exponent (real SmolLM2 fine-tune: order-0 entropy 3.86 bits / weight,
   3.16 bits given the exponent).

   - Format 2 (written by default, :mod:`.exact_huff`): element order, a canonical Huffman table
     per exponent, four interleaved bit lanes; decoding is one pass with no permutation.
   - Format 1 (still read, written on request, :mod:`.exact_v1`): symbols sorted by exponent and
     zstd-coded, so zstd's per-block Huffman sees one exponent at a time; its decoder pays for
     the gather back into element order.

Kernels are compiled with numba when it is installed; otherwise NumPy produces the same bytes
(format 2 then decodes with a Python loop: correct, but ~500x slower). Blocks of rows are coded
independently, so a tensor streams block by block.
"""
from __future__ import annotations

import struct
import threading

import numpy as np

from ..errors import CodecError
from . import exact_huff, exact_v1
from .exact_lanes import ESCAPE, _numba  # noqa: F401  (re-exported for tests and benchmarks)
from .exact_ref import mono_np as _mono  # noqa: F401
from .exact_ref import unmono_np as _unmono  # noqa: F401
from .exact_ref import zigzag_np as _zigzag_np

MAGIC = b"TSDX"
VERSION = exact_huff.VERSION           # what new writes use
VERSIONS = (exact_v1.VERSION, exact_huff.VERSION)
FLAG_IDENTICAL = 1
_PREFIX = struct.Struct("<4sBBBB")     # magic, version, dtype, k, flags: common to every format

# name -> (code, word bits, exponent shift, exponent mask)
FORMATS = {
    "bfloat16": (0, 16, 7, 0xFF),
    "float16": (1, 16, 10, 0x1F),
    "float32": (2, 32, 23, 0xFF),
}
_BY_CODE = {v[0]: k for k, v in FORMATS.items()}
_WORD = {16: np.uint16, 32: np.uint32}


def _choose_k(z_sample: np.ndarray) -> int:
    """Low bits sent as byte planes: whole bytes below the typical delta's leading byte."""
    if z_sample.size == 0:
        return 0
    typical = int(np.median(z_sample))
    return 8 * (typical.bit_length() // 8) if typical >= 64 else 0


def _words(x, fmt: str, what: str) -> np.ndarray:
    """A contiguous flat view of ``x`` (numpy or torch) as unsigned words of ``fmt``'s width."""
    try:
        import torch
    except ImportError:   # pragma: no cover
        torch = None
    bits = FORMATS[fmt][1]
    if torch is not None and isinstance(x, torch.Tensor):
        want = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[fmt]
        if x.dtype != want:
            raise CodecError(f"{what}: expected {fmt}, got {x.dtype}")
        x = x.detach().contiguous().view(torch.int16 if bits == 16 else torch.int32).numpy()
    x = np.ascontiguousarray(x)
    if x.dtype.itemsize * 8 != bits:
        raise CodecError(f"{what}: expected {bits}-bit words for {fmt}, got {x.dtype}")
    return x.reshape(-1).view(_WORD[bits])


def _compressor(level: int | None):
    """zstd with the match finder all but off (``level=None``): the symbols are noise to LZ, and
    without matches zstd's blocks are Huffman-coded literals, smaller and faster to decode than
    level 1's; or a standard zstd ``level``."""
    import zstandard

    if level is not None:
        return zstandard.ZstdCompressor(level=level)
    params = zstandard.ZstdCompressionParameters(window_log=17, hash_log=6, chain_log=6, search_log=1, min_match=7,
                                                 target_length=0, strategy=zstandard.STRATEGY_FAST)
    return zstandard.ZstdCompressor(compression_params=params)


_THREAD = threading.local()     # a zstd decompression context per thread: making one costs ~35 us a block


def _decompressor():
    """(blob, count, dtype) -> ``count`` items of ``dtype`` from a zstd frame; CodecError if corrupt.
    The zstd context is made once per thread (a context serves one call at a time)."""
    import zstandard

    dctx = getattr(_THREAD, "dctx", None)
    if dctx is None:
        dctx = _THREAD.dctx = zstandard.ZstdDecompressor()

    def decompress(blob: bytes, count: int, dtype) -> np.ndarray:
        try:
            return np.frombuffer(dctx.decompress(blob, max_output_size=count * np.dtype(dtype).itemsize), dtype)
        except zstandard.ZstdError as exc:
            raise CodecError(f"exact delta: corrupt payload ({exc})") from exc

    return decompress


def header_size(version: int = VERSION) -> int:
    """Bytes of a block's header in ``version``: all that an identical block costs."""
    return exact_huff.HEADER.size if version == exact_huff.VERSION else exact_v1.HEADER.size


def encode_delta(base, target, fmt: str = "bfloat16", level: int | None = None, use_numba: bool = True,
                 version: int = VERSION) -> bytes:
    """Encode ``target`` exactly as a delta of ``base`` (same shape, ``fmt`` bit patterns).

    Args:
        base, target: torch tensors of dtype ``fmt``, or NumPy arrays of its bit patterns (uint16 /
            uint32, or any dtype of that width); rows of a block, any shape, equal shapes.
        fmt: "bfloat16", "float16" or "float32".
        level: zstd level of the zstd-framed streams (format 2: low byte planes and escapes;
            format 1: every stream); None (default): zstd as a Huffman literal coder, no match
            search.
        use_numba: use the compiled kernels when numba is installed (same bytes either way).
        version: the block format, 2 (default) or 1 (the exponent-sorted zstd layout).
    Returns:
        bytes that :func:`decode_delta` turns back into ``target``'s exact bit patterns.

    Example:
        >>> import torch
        >>> b = torch.randn(64, 32).bfloat16(); t = (b + 1e-3 * torch.randn(64, 32)).bfloat16()
        >>> torch.equal(decode_delta(b, encode_delta(b, t)).view(torch.int16), t.view(torch.int16))
        True
    """
    if fmt not in FORMATS:
        raise CodecError(f"exact delta: unsupported format {fmt!r}; supported: {sorted(FORMATS)}")
    if version not in VERSIONS:
        raise CodecError(f"exact delta: unknown format version {version}; known: {VERSIONS}")
    code, bits, eshift, emask = FORMATS[fmt]
    if tuple(getattr(base, "shape", ())) != tuple(getattr(target, "shape", ())):
        raise CodecError(f"exact delta: base shape {tuple(base.shape)} != target shape {tuple(target.shape)}")
    b, t = _words(base, fmt, "base"), _words(target, fmt, "target")
    if np.array_equal(b, t):
        if version == exact_v1.VERSION:
            return exact_v1.HEADER.pack(MAGIC, version, code, 0, FLAG_IDENTICAL, b.size, 0, 0, 0, 0)
        return exact_huff.identical_header(code, b.size, FLAG_IDENTICAL)
    step = max(1, b.size // 4096)
    k = _choose_k(_zigzag_np(b[::step], t[::step], bits))
    compress = _compressor(level).compress
    if version == exact_v1.VERSION:
        return exact_v1.encode_v1(b, t, code, bits, eshift, emask, k, compress, use_numba)
    rows = int(base.shape[0]) if len(getattr(base, "shape", ())) >= 2 else 1
    return exact_huff.encode_v2(b, t, code, bits, eshift, emask, k, _WORD[bits], compress, use_numba, rows)


def decode_delta(base, data: bytes, use_numba: bool = True):
    """Rebuild the target from ``base`` and :func:`encode_delta`'s bytes (format 1 or 2), bit for bit.

    Args:
        base: the same base block given to :func:`encode_delta` (torch tensor or NumPy words).
        data: the encoded bytes.
        use_numba: use the compiled kernels when numba is installed.
    Returns:
        the target, same type (torch tensor of ``fmt``, or NumPy words) and shape as ``base``.
    Raises:
        CodecError: bytes that are not an exact delta, or a base of the wrong size or format.
    """
    if len(data) < _PREFIX.size:
        raise CodecError(f"exact delta: {len(data)} bytes is shorter than the header")
    magic, version, code, _, _ = _PREFIX.unpack_from(data)
    if magic != MAGIC or version not in VERSIONS or code not in _BY_CODE:
        raise CodecError(f"exact delta: not an exact delta (magic {magic!r}, version {version}, dtype {code})")
    parsed = exact_v1.parse_v1(data) if version == exact_v1.VERSION else exact_huff.parse_v2(data)
    fmt = _BY_CODE[code]
    _, bits, eshift, emask = FORMATS[fmt]
    flags, n = parsed[2], parsed[3]
    b = _words(base, fmt, "base")
    if b.size != n:
        raise CodecError(f"exact delta: encoded for {n} elements, base has {b.size}")
    if flags & FLAG_IDENTICAL:
        out = b.copy()
    elif version == exact_v1.VERSION:
        out = exact_v1.decode_v1(b, parsed, bits, eshift, emask, _WORD[bits], _decompressor(), use_numba)
    else:
        out = exact_huff.decode_v2(b, parsed, bits, eshift, emask, _WORD[bits], _decompressor(), use_numba)
    return _like(base, out, fmt)


def _like(base, words: np.ndarray, fmt: str):
    """``words`` shaped and typed like ``base`` (torch tensor of ``fmt``, or NumPy words)."""
    shape = tuple(base.shape)
    try:
        import torch
    except ImportError:   # pragma: no cover
        torch = None
    if torch is not None and isinstance(base, torch.Tensor):
        signed = torch.from_numpy(words.view(np.int16 if words.itemsize == 2 else np.int32))
        want = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[fmt]
        return signed.view(want).reshape(shape)
    return words.view(np.asarray(base).dtype).reshape(shape)
