"""Summary numbers of a teacher-logit dataset: tokens, stored pairs, bytes per pair / token, coverage."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .encoding import teacher_column, teachers_in
from .shards import open_dataset


def dataset_stats(path) -> dict:
    """Sizes and target statistics of a committed dataset (shards checksum-verified while read).

    Returns a dict: sequences, tokens, pairs (stored ids), unique_per_position, bytes (all shard
    files), bytes_per_token, bytes_per_pair (whole files / pairs), target_bytes_per_pair (only the
    ``n_ids``, ``ids``, ``counts`` / ``weights`` / ``logprobs`` column chunks, compressed),
    coverage (mean teacher probability mass on the stored ids) and teachers. With several
    teachers, pairs and bytes count all of them, unique_per_position and coverage are per teacher.

    Example:
        >>> dataset_stats("/tmp/kd")["bytes_per_pair"]   # doctest: +SKIP
        1.9
    """
    ds = open_dataset(path) if isinstance(path, str) else path
    sequences = tokens = pairs = 0
    coverage = []
    target_bytes = 0
    targets = {"n_ids", "ids", "counts", "weights", "logprobs"}
    teachers = 1
    for name in ds.shard_names():
        data = ds.read_bytes(name)
        table = pq.read_table(pa.BufferReader(data))
        teachers = teachers_in(table)
        for j in range(teachers):
            for blob in table.column(teacher_column("n_ids", j, teachers)).to_pylist():
                lengths = np.frombuffer(blob, dtype="<u1" if blob[0] == 0 else "<u2", offset=1)
                pairs += int(lengths.sum())
                tokens += len(lengths) if j == 0 else 0
            coverage += table.column(teacher_column("coverage", j, teachers)).to_pylist()
        sequences += table.num_rows
        meta = pq.ParquetFile(pa.BufferReader(data)).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                col = group.column(c)
                if col.path_in_schema.rsplit(".", 1)[-1] in targets:
                    target_bytes += col.total_compressed_size
    size = ds.shard_bytes()
    return {"sequences": sequences, "tokens": tokens, "pairs": pairs,
            "unique_per_position": pairs / max(tokens * teachers, 1), "bytes": size, "teachers": teachers,
            "bytes_per_token": size / max(tokens, 1), "bytes_per_pair": size / max(pairs, 1),
            "target_bytes_per_pair": target_bytes / max(pairs, 1),
            "coverage": float(np.nanmean(coverage)) if coverage else float("nan")}
