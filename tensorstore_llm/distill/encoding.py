"""On-disk encoding of sparse teacher targets: one Parquet row per sequence, CSR per position.

Codec ``gap-planes-v1`` (the default; measured in tests/benchmarks/bench_distill.py):

- per position the stored ids are ascending; the first is kept as is and each next one as the
  gap to its predecessor (so every value is < vocab and fits the vocabulary's byte width
  w = ceil(bits(vocab - 1) / 8));
- the gaps of a whole sequence are split into w byte *planes* (all low bytes, then all next
  bytes, ...), so that the mostly-small high bytes compress apart from the near-uniform low bytes;
- counts are one uint8 per pair (uint16 when N > 255), apart from the ids;
- the number of stored ids per position (``n_ids``, uint8 or uint16) gives the CSR offsets;
- Parquet compresses each binary column with zstd.

Columns of a shard (one row per sequence): ``sequence`` (int64 global index), ``input_ids``
(list<int32>), ``coverage`` (float64: mean teacher mass on the stored ids), ``n_ids``, ``ids``, and
``counts`` (RS-KD) / ``weights`` (RS-KD τ ≠ 1, float32) / ``logprobs`` (top-k and full, float32),
plus, when asked, ``nll`` (float32 per token: the teacher's -log p of token j given tokens < j;
NaN at j = 0), ``text`` and ``char_offsets`` (int32 [seq_len, 2]) for cross-tokenizer students.

A dataset of several teachers (same tokenizer and packing) keeps ``sequence``, ``input_ids``,
``text`` and ``char_offsets`` once and every per-teacher column (``coverage``, ``n_ids``,
``ids``, ``counts`` / ``weights`` / ``logprobs``, ``nll``) once per teacher j, named
``teacher<j>.<column>``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .sampling import SparseRows

CODEC = "gap-planes-v1"


def id_width(vocab: int) -> int:
    """Bytes per id plane count for a vocabulary of ``vocab`` ids (2 for 49152, 3 for 128k)."""
    return max(1, ((max(int(vocab), 2) - 1).bit_length() + 7) // 8)


def encode_ids(ids: np.ndarray, offsets: np.ndarray, width: int) -> bytes:
    """Gap-code ascending-per-row ids and split them into ``width`` byte planes."""
    ids = ids.astype(np.int64)
    gaps = ids.copy()
    gaps[1:] -= ids[:-1]
    starts = offsets[:-1][offsets[:-1] < offsets[1:]]
    gaps[starts] = ids[starts]
    if gaps.size and gaps.min() < 0:
        raise ValueError("ids must be ascending within each position")
    raw = gaps.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :width]   # [nnz, width] little-endian bytes
    return np.ascontiguousarray(raw.T).tobytes()


def decode_ids(blob: bytes, offsets: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`encode_ids`: int32 ids [nnz]."""
    nnz = int(offsets[-1])
    planes = np.frombuffer(blob, dtype=np.uint8)
    if planes.size != nnz * width:
        raise ValueError(f"ids blob holds {planes.size} bytes, expected {nnz * width}")
    gaps = np.zeros(nnz, dtype=np.int64)
    for b in range(width):
        gaps |= planes[b * nnz:(b + 1) * nnz].astype(np.int64) << (8 * b)
    total = np.cumsum(gaps)
    lengths = np.diff(offsets)
    starts = offsets[:-1]
    before = np.where(starts > 0, total[np.maximum(starts - 1, 0)] if nnz else 0, 0)
    return (total - np.repeat(before, lengths)).astype(np.int32)


SHARED_COLUMNS = ("sequence", "input_ids", "text", "char_offsets")


def teacher_column(name: str, teacher: int, teachers: int) -> str:
    """The column holding ``name`` for teacher ``teacher`` of ``teachers`` (prefixed when several)."""
    return name if teachers == 1 or name in SHARED_COLUMNS else f"teacher{teacher}.{name}"


def schema(kind: str, *, with_alignment: bool = False, teachers: int = 1) -> pa.Schema:
    """Arrow schema of a shard for ``kind`` in {'rs-kd', 'rs-kd-weighted', 'top-k', 'full'}.

    With ``teachers`` > 1 the per-teacher columns repeat with ``teacher<j>.`` prefixes.
    """
    if teachers > 1:
        one = schema(kind, with_alignment=with_alignment)
        shared = [f for f in one if f.name in SHARED_COLUMNS]
        return pa.schema(shared + [pa.field(teacher_column(f.name, j, teachers), f.type)
                                   for j in range(teachers) for f in one if f.name not in SHARED_COLUMNS])
    fields = [("sequence", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("coverage", pa.float64()),
              ("n_ids", pa.binary()), ("ids", pa.binary())]
    fields += {"rs-kd": [("counts", pa.binary())],
               "rs-kd-weighted": [("counts", pa.binary()), ("weights", pa.binary())],
               "top-k": [("logprobs", pa.binary())], "full": [("logprobs", pa.binary())]}[kind]
    if with_alignment:
        fields += [("nll", pa.binary()), ("text", pa.large_string()), ("char_offsets", pa.binary())]
    return pa.schema(fields)


@dataclass
class SequenceTargets:
    """One sequence's stored data, decoded: token ids, CSR targets and optional alignment data."""

    sequence: int
    input_ids: np.ndarray               # int32 [L]
    rows: SparseRows                    # L positions
    nll: np.ndarray | None = None       # float32 [L]
    text: str | None = None
    char_offsets: np.ndarray | None = None  # int32 [L, 2]
    coverage: float = float("nan")      # mean teacher mass on the stored ids per position


def encode_rows(kind: str, sequences: list[SequenceTargets], vocab: int, draws: int) -> pa.Table:
    """An Arrow table (one row per sequence) in codec ``gap-planes-v1``."""
    width = id_width(vocab)
    count_dtype = "<u1" if draws < 256 else "<u2"
    with_alignment = sequences[0].nll is not None
    cols: dict[str, list] = {name: [] for name in schema(kind, with_alignment=with_alignment).names}
    for s in sequences:
        r = s.rows
        lengths = np.diff(r.offsets)
        n_dtype = "<u1" if lengths.max(initial=0) < 256 else "<u2"
        cols["sequence"].append(int(s.sequence))
        cols["input_ids"].append(s.input_ids.astype(np.int32))
        cols["coverage"].append(float(np.mean(r.coverage)) if r.coverage is not None else float("nan"))
        cols["n_ids"].append(bytes([0 if n_dtype == "<u1" else 1]) + lengths.astype(n_dtype).tobytes())
        cols["ids"].append(encode_ids(r.ids, r.offsets, width))
        if "counts" in cols:
            cols["counts"].append(r.counts.astype(count_dtype).tobytes())
        if "weights" in cols:
            cols["weights"].append(r.weights.astype("<f4").tobytes())
        if "logprobs" in cols:
            cols["logprobs"].append(r.logprobs.astype("<f4").tobytes())
        if with_alignment:
            cols["nll"].append(s.nll.astype("<f4").tobytes())
            cols["text"].append(s.text)
            cols["char_offsets"].append(s.char_offsets.astype("<i4").tobytes())
    return pa.table(cols, schema=schema(kind, with_alignment=with_alignment))


def encode_teachers(kind: str, per_teacher: list[list[SequenceTargets]], vocab: int, draws: int) -> pa.Table:
    """One table for the same sequences from several teachers (see the module docstring).

    ``per_teacher[j][i]`` is sequence i's targets from teacher j; one teacher gives
    :func:`encode_rows`' table unchanged.
    """
    tables = [encode_rows(kind, seqs, vocab, draws) for seqs in per_teacher]
    if len(tables) == 1:
        return tables[0]
    n = len(tables)
    target = schema(kind, with_alignment="nll" in tables[0].column_names, teachers=n)
    columns = {}
    for j, t in enumerate(tables):
        for name in t.column_names:
            columns.setdefault(teacher_column(name, j, n), t.column(name))
    return pa.table([columns[f.name] for f in target], schema=target)


def teachers_in(table_or_schema) -> int:
    """How many teachers a shard holds (1 for unprefixed columns)."""
    names = table_or_schema.names if isinstance(table_or_schema, pa.Schema) else table_or_schema.column_names
    prefixed = {n.split(".", 1)[0] for n in names if n.startswith("teacher") and "." in n}
    return max(1, len(prefixed))


def decode_table(table: pa.Table, vocab: int, draws: int, teacher: int = 0) -> list[SequenceTargets]:
    """Inverse of :func:`encode_rows`: every sequence of a shard table, decoded (for ``teacher``
    ``j`` of a several-teacher table)."""
    width = id_width(vocab)
    count_dtype = "<u1" if draws < 256 else "<u2"
    teachers = teachers_in(table)
    if teachers > 1:
        if not 0 <= teacher < teachers:
            raise ValueError(f"the table holds {teachers} teachers, not teacher {teacher}")
        names = [*schema("rs-kd", with_alignment=True).names, "weights", "logprobs"]
        keep = {teacher_column(n, teacher, teachers): n for n in names}
        table = table.select([c for c in table.column_names if c in keep]).rename_columns(
            [keep[c] for c in table.column_names if c in keep])
    names = set(table.column_names)
    data = {name: table.column(name).to_pylist() for name in names if name != "input_ids"}
    input_ids = table.column("input_ids").combine_chunks()
    flat = input_ids.values.to_numpy(zero_copy_only=False)
    starts = input_ids.offsets.to_numpy()
    out = []
    for i in range(table.num_rows):
        n_blob = data["n_ids"][i]
        lengths = np.frombuffer(n_blob, dtype="<u1" if n_blob[0] == 0 else "<u2", offset=1)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        rows = SparseRows(offsets, decode_ids(data["ids"][i], offsets, width))
        if "counts" in names:
            rows.counts = np.frombuffer(data["counts"][i], dtype=count_dtype)
        if "weights" in names:
            rows.weights = np.frombuffer(data["weights"][i], dtype="<f4")
        if "logprobs" in names:
            rows.logprobs = np.frombuffer(data["logprobs"][i], dtype="<f4")
        seq = SequenceTargets(int(data["sequence"][i]), flat[starts[i]:starts[i + 1]], rows,
                              coverage=data["coverage"][i])
        if "nll" in names:
            seq.nll = np.frombuffer(data["nll"][i], dtype="<f4")
            seq.text = data["text"][i]
            seq.char_offsets = np.frombuffer(data["char_offsets"][i], dtype="<i4").reshape(-1, 2)
        out.append(seq)
    return out
