"""What rebuilding one stored block of a delta-stored artifact holds in memory, from its header.

The reader's memory model (``DeltaTensorSource.extra_read_bytes``) adds, per block it may have in
flight, the bytes that block's rebuild holds at its peak beyond the caller's rows. An exact block
says in its header how much it will allocate, so the model reads the headers (a few hundred bytes
per block, once per artifact) and counts, with ``B`` the block's rows in the tensor's dtype and
``C`` its coded bytes:

- every block: the parent's rows (``B``, none for a raw block), the coded bytes (``C``) and the
  rebuilt rows (``B``);
- exact format 2: the decoder's copy of its bit lanes, the decompressed low byte planes
  (``k/8`` bytes per element) and escapes; in a block with a row map (only some rows changed)
  the changed rows gathered from the parent and rebuilt before they are scattered into place;
- exact format 1: its three decompressed streams (a symbol byte per element, the low planes and
  the escapes) and the copies of their frames;
- a raw (zstd-framed) block: the decompressed bytes and their writable copy;
- a lossy codec, or a block whose header cannot be read: ``LOSSY_BUFFERS`` block-sized buffers
  (lossy decoders rebuild a whole tensor from factors with fp32 temporaries).
"""
from __future__ import annotations

import struct

import numpy as np

from . import exact_huff, exact_v1
from .exact import FLAG_IDENTICAL, FORMATS, MAGIC

LOSSY_BUFFERS = 6   # parent, coded bytes, fp32 factors / temporaries (2 blocks for bf16), rebuilt rows, slack
_BITS = {code: FORMATS[name][1] for name, (code, *_rest) in FORMATS.items()}


def block_holding(path: str, mode: str, codec_name: str, block_bytes: int, coded_bytes: int) -> int:
    """Bytes rebuilding the block stored at ``path`` holds at its peak: see the module docstring.
    ``block_bytes``: its rows in the tensor's dtype; ``coded_bytes``: its recorded stored size.
    Never raises: a block that cannot be read is counted conservatively (the read reports it)."""
    B, C = block_bytes, coded_bytes
    if mode == "raw":
        return C + 2 * B
    if codec_name != "exact":
        return LOSSY_BUFFERS * B
    try:
        with open(path, "rb") as f:
            head = f.read(exact_huff.HEADER.size)
            fields = _exact_fields(head, f, B)
    except (OSError, struct.error, ValueError):
        fields = None
    if fields is None:
        return LOSSY_BUFFERS * B + C
    return C + B + fields


def _exact_fields(head: bytes, f, B: int) -> int | None:
    """Bytes an exact block's decoder allocates at its peak beyond the parent's rows and the coded
    bytes (the rebuilt rows ``B`` included); None when the header is not an exact delta's."""
    if len(head) < 8 or head[:4] != MAGIC:
        return None
    version, code, k, flags = head[4], head[5], head[6], head[7]
    if code not in _BITS:
        return None
    word = _BITS[code] // 8
    kb = k // 8
    if version == exact_v1.VERSION:
        _, _, _, _, _, n, n_esc, *lens = exact_v1.HEADER.unpack_from(head)
        if flags & FLAG_IDENTICAL:
            return B
        return B + sum(lens) + n + n * kb + n_esc * word    # output, frames copied out, sym, low planes, escapes
    if version != exact_huff.VERSION or len(head) < exact_huff.HEADER.size:
        return None
    _, _, _, _, _, n, n_esc, _, _, _, *bit_counts = exact_huff.HEADER.unpack_from(head)
    lanes = 8 * (sum(-(-c // 64) for c in bit_counts) + 2)
    if flags & FLAG_IDENTICAL:
        return lanes + B
    if not flags & exact_huff.FLAG_ROWS:
        return lanes + n * kb + n_esc * word + B
    rows_raw = f.read(8)
    (rows,) = struct.unpack("<Q", rows_raw)
    if rows < 2 or n % rows:
        return None
    bitmap = np.frombuffer(f.read(-(-rows // 8)), np.uint8)
    changed = int(np.unpackbits(bitmap, count=rows, bitorder="little").sum()) if bitmap.size == -(-rows // 8) else rows
    m = changed * (n // rows)
    # while decoding: the changed rows gathered from the parent and rebuilt (with their planes and
    # escapes); then the rebuilt changed rows beside the full output they are scattered into
    return lanes + max(2 * m * word + m * kb + n_esc * word, m * word + B)


__all__ = ["LOSSY_BUFFERS", "block_holding"]
