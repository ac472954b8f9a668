"""Writing and reading a dataset of Parquet shards: staged, journalled, checksummed, verified.

Precompute writes through the store's dataset writer (``store.create_dataset``) by default; for
a plain directory (``--out DIR``) :class:`ShardWriter` offers the same verbs:

- ``writer.completed_shards() -> {name: sha256}``: shards already written and verified (resume);
- ``writer.write_shard(name, table) -> sha256``: write, fsync, read back and compare, journal;
- ``writer.commit(kind=..., parents=[...], info={...}, files={...}) -> path``: write
  ``dataset.json`` last and rename the staging directory into place (atomic publish).

``open_dataset(path).read_shard(name)`` checks the shard's sha256 against ``dataset.json`` before
parsing those bytes, so a corrupt or truncated shard raises IntegrityError instead of reading as
zeros; ``open_dataset(ref, store)`` answers the same verbs for a store artifact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DatasetMismatch, FormatError, IntegrityError, OutputExists
from ..io.fsutil import file_sha256, fsync_path

MANIFEST = "dataset.json"
JOURNAL = "journal.jsonl"
JOB_KEY = "job_key"
ZSTD_LEVEL = 19   # 1.80 vs 1.87 B/pair at level 9 on SmolLM2 targets; shards are small, writing stays cheap


class ShardWriter:
    """Stages Parquet shards for the dataset that will live at ``out_dir``.

    The staging directory ``<out_dir>.partial`` survives a crash; a new writer for the same
    ``out_dir`` resumes from its journal, keeping every shard whose bytes still match.

    Example:
        >>> w = ShardWriter("/tmp/ds")                        # doctest: +SKIP
        >>> w.write_shard("shard-00000.parquet", table)       # doctest: +SKIP
        >>> w.commit(kind="logits", parents=[], info={}, files={})   # doctest: +SKIP
    """

    def __init__(self, out_dir: str, *, job_key: str = "", compression_level: int = ZSTD_LEVEL):
        self.out_dir = os.path.abspath(out_dir)
        if os.path.exists(os.path.join(self.out_dir, MANIFEST)):
            raise OutputExists(f"{self.out_dir} already holds a committed dataset; choose another output")
        self.staging = self.out_dir + ".partial"
        os.makedirs(self.staging, exist_ok=True)
        key_path = os.path.join(self.staging, JOB_KEY)
        if os.path.exists(key_path):
            with open(key_path, encoding="utf-8") as f:
                previous = f.read().strip()
            if previous != job_key:
                raise DatasetMismatch(f"{self.staging} holds a partial run with other settings (job key "
                                      f"{previous[:16]}..., now {job_key[:16]}...); delete it or use another output")
        else:
            with open(key_path, "w", encoding="utf-8") as f:
                f.write(job_key)
        self.level = compression_level
        self._journal_path = os.path.join(self.staging, JOURNAL)

    def completed_shards(self) -> dict[str, str]:
        """{name: sha256} of journalled shards whose file is present and still matches."""
        done: dict[str, str] = {}
        if not os.path.exists(self._journal_path):
            return done
        with open(self._journal_path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:   # a line cut by a crash
                    continue
                path = os.path.join(self.staging, entry["name"])
                if os.path.isfile(path) and file_sha256(path) == entry["sha256"]:
                    done[entry["name"]] = entry["sha256"]
        return done

    def write_shard(self, name: str, table: pa.Table) -> str:
        """Write ``table`` as Parquet (zstd), fsync, read back and compare, journal; return sha256.

        Raises IntegrityError when the read-back table differs from ``table``.
        """
        if "/" in name or name.startswith(".") or name in (MANIFEST, JOURNAL, JOB_KEY):
            raise FormatError(f"invalid shard name {name!r}")
        path = os.path.join(self.staging, name)
        tmp = path + ".tmp"
        pq.write_table(table, tmp, compression="zstd", compression_level=self.level, use_dictionary=False,
                       write_statistics=False)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if not pq.read_table(tmp).equals(table):
            raise IntegrityError(f"{tmp}: shard read back differs from what was written")
        checksum = file_sha256(tmp)
        os.replace(tmp, path)
        with open(self._journal_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "sha256": checksum}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return checksum

    def commit(self, *, kind: str, parents: list[str], info: dict, files: dict[str, dict]) -> str:
        """Write ``dataset.json`` last and rename the staging directory to ``out_dir``; return it.

        ``files`` maps shard name -> {"sha256": ..., plus anything else (rows, bytes)}.
        """
        if os.path.exists(self.out_dir):
            raise OutputExists(f"{self.out_dir} already exists")
        manifest = {"kind": kind, "parents": parents, "info": info, "files": files}
        path = os.path.join(self.staging, MANIFEST)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        for name in (JOURNAL, JOB_KEY):
            if os.path.exists(os.path.join(self.staging, name)):
                os.remove(os.path.join(self.staging, name))
        fsync_path(self.staging)
        os.rename(self.staging, self.out_dir)
        fsync_path(os.path.dirname(self.out_dir))
        return self.out_dir

    def close(self) -> None:
        """Stop writing; the staging directory stays for a later run to resume (nothing is held open)."""

    def abort(self) -> None:
        """Remove the staging directory and everything in it."""
        shutil.rmtree(self.staging, ignore_errors=True)


class ShardDataset:
    """A committed dataset directory: its manifest and verified shard reads."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        manifest = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(manifest):
            unfinished = os.path.isdir(self.path + ".partial")
            hint = " (an unfinished run: re-run the same precompute to resume it)" if unfinished else ""
            raise FormatError(f"{self.path}: not a committed dataset, no {MANIFEST}{hint}")
        with open(manifest, encoding="utf-8") as f:
            self.manifest = json.load(f)
        self.kind = self.manifest["kind"]
        self.info = self.manifest["info"]
        self.files = self.manifest["files"]

    def shard_names(self) -> list[str]:
        return sorted(self.files)

    def read_bytes(self, name: str) -> bytes:
        """The shard's bytes, after checking their sha256; IntegrityError if they differ."""
        if name not in self.files:
            raise FormatError(f"{self.path}: no shard {name!r}")
        path = os.path.join(self.path, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise IntegrityError(f"{path}: shard file is missing") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != self.files[name]["sha256"]:
            raise IntegrityError(f"{path}: sha256 {actual[:16]}... differs from the recorded "
                                 f"{self.files[name]['sha256'][:16]}...; the shard is corrupt or truncated")
        return data

    def read_shard(self, name: str) -> pa.Table:
        """The shard's table, parsed from the bytes whose sha256 was checked."""
        return pq.read_table(pa.BufferReader(self.read_bytes(name)))

    def shard_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.path, n)) for n in self.files)


class StoreDataset:
    """A store artifact of kind ``logits`` seen through the same verbs as :class:`ShardDataset`.

    Reads go through the store's ``DatasetSource`` (xxh3-checked on every read).
    """

    def __init__(self, store, ref: str):
        artifact = store.get(ref)
        self.source = store.open_dataset(ref)
        self.path = f"artifact {artifact.short_id}"
        self.id = artifact.id
        self.kind = artifact.kind
        self.info = self.source.info
        self.files = {n: {"sha256": self.source.record(n).checksum} for n in self.source.shards()}

    def shard_names(self) -> list[str]:
        return self.source.shards()

    def read_bytes(self, name: str) -> bytes:
        return self.source.read_bytes(name)

    def read_shard(self, name: str) -> pa.Table:
        return self.source.read_shard(name)

    def shard_bytes(self) -> int:
        return sum(self.source.record(n).bytes for n in self.source.shards())


def open_dataset(path: str, store=None):
    """Open a teacher-logit dataset: a committed directory, or (when not a directory and a store is
    given) a store artifact ref. Both answer ``shard_names`` / ``read_shard`` / ``info``."""
    if store is not None and not os.path.isdir(path):
        return StoreDataset(store, path)
    return ShardDataset(path)
