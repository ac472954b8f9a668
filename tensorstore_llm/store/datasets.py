"""Arrow / Parquet datasets as artifact payloads: staged shards, checksummed, verified on read.

A dataset artifact (teacher logits, any table) holds named Parquet shards under ``data/``. Each
shard is written to a hidden temporary, made durable, read back and compared with the table it
was made from, and only then renamed into place and journaled, so a killed writer leaves either
a whole, verified shard or nothing, and a re-run resumes after the last journaled one. The
manifest records each shard's sha256 (part of the artifact id), an xxh3-64 checksum (checked on
every read), its size and its row count. Readers load a shard's bytes once, check them, and
parse those same bytes: a flipped byte or a truncated shard is an IntegrityError, never a table.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass

import xxhash

from ..errors import FormatError, IntegrityError
from ..io.base import Closing
from ..io.fsutil import fsync_path, storage_errors
from ..io.journal import Journal

DATA_DIR = "data"
SHARD_JOURNAL = "shards.jsonl"
SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
ZSTD_LEVEL = 9


@dataclass(frozen=True)
class ShardRecord:
    """What the manifest knows of one shard: sha256 (content), xxh3-64 (read check), size, rows."""

    checksum: str
    xxh3: str
    bytes: int
    rows: int

    def to_json(self) -> dict:
        return {"checksum": self.checksum, "xxh3": self.xxh3, "bytes": self.bytes, "rows": self.rows}

    @classmethod
    def from_json(cls, body: dict) -> ShardRecord:
        return cls(str(body["checksum"]), str(body["xxh3"]), int(body["bytes"]), int(body["rows"]))


def check_shard_name(name: str, where: str) -> str:
    """``name`` if it is a safe shard file name (letters, digits, ``._-``, no leading symbol)."""
    if not isinstance(name, str) or not SHARD_NAME_RE.match(name) or name.endswith(".tmp"):
        raise FormatError(f"{where}: shard name {name!r} is not allowed (use letters, digits, '.', '_', '-')")
    return name


def _record_of(data: bytes, rows: int) -> ShardRecord:
    return ShardRecord("sha256:" + hashlib.sha256(data).hexdigest(), xxhash.xxh3_64_hexdigest(data), len(data), rows)


class DatasetPayload:
    """Stages the Parquet shards of one dataset artifact under ``<staging_dir>/data``."""

    def __init__(self, staging_dir: str, where: str):
        self.staging_dir = staging_dir
        self.where = where
        self.data_dir = os.path.join(staging_dir, DATA_DIR)
        with storage_errors(where):
            os.makedirs(self.data_dir, exist_ok=True)
        self.journal = Journal(os.path.join(staging_dir, SHARD_JOURNAL))
        self._records: dict[str, ShardRecord] | None = None

    def completed_shards(self) -> dict[str, str]:
        """Shards finished by this or an earlier, interrupted run of the same job: name -> sha256.

        Each journaled shard is re-read and kept only if its bytes still hash as journaled.
        """
        if self._records is None:
            self._records = {}
            for name, checksum in self.journal.completed().items():
                path = os.path.join(self.data_dir, name)
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                record = _record_of(data, 0)
                rows = _rows_of(data) if record.checksum == checksum else None
                if rows is not None:   # as journaled and still a Parquet file: kept; otherwise rewritten
                    self._records[name] = ShardRecord(record.checksum, record.xxh3, record.bytes, rows)
        return {n: r.checksum for n, r in self._records.items()}

    def write_shard(self, name: str, table, *, compression_level: int = ZSTD_LEVEL) -> str:
        """Write ``table`` (a ``pyarrow.Table``) as shard ``name``; returns its sha256.

        The Parquet bytes are made in memory (zstd, no dictionary), parsed back and compared with
        ``table`` before they touch the disk; then written to a hidden temporary, fsynced, renamed
        and journaled. Writing the same name again replaces the shard.
        """
        import pyarrow.parquet as pq

        check_shard_name(name, self.where)
        self.completed_shards()
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd", compression_level=compression_level,
                       use_dictionary=False, write_statistics=False)
        data = sink.getvalue()
        if not pq.read_table(io.BytesIO(data)).equals(table):
            raise IntegrityError(f"{self.where}: shard {name!r} does not read back as the table it was made from")
        record = _record_of(data, table.num_rows)
        path = os.path.join(self.data_dir, name)
        tmp = os.path.join(self.data_dir, f".{name}.tmp")
        with storage_errors(self.where):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self.journal.record(name, record.checksum)
        self._records[name] = record
        return record.checksum

    def records(self) -> dict[str, ShardRecord]:
        """Every finished shard's record, for the manifest."""
        self.completed_shards()
        return dict(self._records)

    def seal(self) -> None:
        """Close the journal and make every shard durable before the manifest is written."""
        self.journal.close()
        with storage_errors(self.where):
            journal = os.path.join(self.staging_dir, SHARD_JOURNAL)
            if os.path.exists(journal):
                os.remove(journal)
            fsync_path(self.data_dir)

    def close(self) -> None:
        self.journal.close()


def _rows_of(data: bytes) -> int | None:
    """The row count in a Parquet file's footer, or None when ``data`` is not a readable Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
    except (pa.ArrowException, OSError, ValueError):
        return None


class DatasetSource(Closing):
    """Verified reads of a committed dataset artifact's shards.

    Example:
        >>> with store.open_dataset("teacher-logits") as ds:        # doctest: +SKIP
        ...     table = ds.read_shard(ds.shards()[0])
    """

    def __init__(self, artifact_dir: str, shards: dict[str, ShardRecord], label: str, info: dict | None = None):
        self.path = artifact_dir
        self.label = label
        self.info = dict(info or {})
        self._shards = shards

    def shards(self) -> list[str]:
        """Shard names in name order."""
        return sorted(self._shards)

    def record(self, name: str) -> ShardRecord:
        if name not in self._shards:
            raise FormatError(f"{self.label}: has no shard {name!r}")
        return self._shards[name]

    def read_bytes(self, name: str) -> bytes:
        """The bytes of shard ``name``, checked against the manifest (IntegrityError otherwise)."""
        record = self.record(name)
        path = os.path.join(self.path, DATA_DIR, name)
        try:
            with open(path, "rb") as f:
                data = f.read(record.bytes + 1)
        except FileNotFoundError:
            raise IntegrityError(f"{self.label}: shard {name!r} is missing ({path})") from None
        if len(data) != record.bytes:
            raise IntegrityError(f"{self.label}: shard {name!r} has {len(data)} bytes, recorded {record.bytes} ({path})")
        actual = xxhash.xxh3_64_hexdigest(data)
        if actual != record.xxh3:
            raise IntegrityError(f"{self.label}: shard {name!r} is corrupted: checksum mismatch "
                                 f"(xxh3_64 {actual}, recorded {record.xxh3}) ({path})")
        return data

    def read_shard(self, name: str, columns: list[str] | None = None):
        """Shard ``name`` as a ``pyarrow.Table`` (only ``columns`` if given), verified first."""
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(self.read_bytes(name)), columns=columns)

    def verify(self) -> list[str]:
        """Problems found re-reading every shard (sha256 and xxh3); empty when all match."""
        problems = []
        for name in self.shards():
            try:
                data = self.read_bytes(name)
            except IntegrityError as e:
                problems.append(str(e))
                continue
            if "sha256:" + hashlib.sha256(data).hexdigest() != self._shards[name].checksum:
                problems.append(f"shard {name!r}: sha256 does not match the manifest")
        return problems
