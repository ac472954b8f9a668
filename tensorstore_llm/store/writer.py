"""Staging one artifact around a payload writer, under an exclusive job lock, and publishing it."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import FormatError, StorageError
from ..io.base import checksum_bytes
from ..io.fsutil import fsync_tree, remove_tree, storage_errors
from .datasets import DatasetPayload
from .dedup import dedup_blocks, dedup_staged
from .info import check_info
from .manifest import KINDS, Manifest, now_utc, record_from

if TYPE_CHECKING:
    from .store import Artifact, Store


def try_lock(path: str) -> int | None:
    """Take the job lock of a staging dir without waiting; None if another process holds it."""
    lock_path = os.path.join(path, ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:
        os.close(fd)
        return None


class ArtifactWriter:
    """Stages one artifact around a payload writer; ``commit`` publishes it, ``abort`` discards it.

    The payload is a Zarr tensor sink (checkpoints, diffs, adapters: the TensorSink verbs below
    are its) or a dataset payload (Parquet shards: ``write_shard`` / ``completed_shards``). Holds
    an exclusive lock on its staging directory for its lifetime, so a second process running the
    same job, or ``gc``, cannot interfere.
    """

    def __init__(self, store: Store, staging_dir: str, make_payload):
        where = f"store {store.root}"
        with storage_errors(where):
            os.makedirs(staging_dir, exist_ok=True)
        self._lock = try_lock(staging_dir)
        if self._lock is None:
            raise StorageError(f"store {store.root}: job {os.path.basename(staging_dir)[:16]} is already running in another process")
        self.store = store
        self.staging_dir = staging_dir
        self.where = where
        self.payload = make_payload(staging_dir, where)

    # -- TensorSink, for tensor payloads ---------------------------------------------------------
    @property
    def metas(self):
        return self.payload.metas

    def prepare(self, metas) -> None:
        self.payload.prepare(metas)

    def preferred_rows(self, meta) -> int:
        return self.payload.preferred_rows(meta)

    def completed(self) -> dict[str, str]:
        return self.payload.completed()

    def write_rows(self, name: str, start: int, block) -> None:
        self.payload.write_rows(name, start, block)

    def finish(self, name: str) -> str:
        return self.payload.finish(name)

    def chunk_digests(self, name: str):
        return self.payload.chunk_digests(name)

    # -- datasets --------------------------------------------------------------------------------
    def completed_shards(self) -> dict[str, str]:
        """Shards of a dataset payload already finished (by an interrupted run too): name -> sha256."""
        return self.payload.completed_shards()

    def write_shard(self, name: str, table, **options) -> str:
        """Write one Parquet shard of a dataset payload (see DatasetPayload.write_shard)."""
        return self.payload.write_shard(name, table, **options)

    # -- publishing ------------------------------------------------------------------------------
    def commit(self, *, kind: str, parents=(), source=None, recipe=None, files=None, run=None,
               info: dict | None = None) -> Artifact:
        """Publish the staged payload as an artifact of ``kind``; every declared tensor must be finished.

        Args:
            files: carried file name -> path or bytes (config, tokenizer, ...).
            info: kind-specific facts (e.g. a logits dataset's fingerprint); part of the id.
        Returns:
            The committed Artifact (an existing one if identical content was committed before).
        """
        if kind not in KINDS:
            raise FormatError(f"{self.where}: unknown artifact kind {kind!r}; expected one of {', '.join(KINDS)}")
        schema = check_info(kind, dict(info or {}), self.where)
        tensors, shards = {}, {}
        if isinstance(self.payload, DatasetPayload):
            shards = self.payload.records()
            if not shards:
                raise StorageError(f"{self.where}: cannot commit a dataset without shards")
        else:
            done = self.completed()
            missing = [n for n in self.metas if n not in done]
            if missing:
                # a caller's bug, not bad input: never reached from the CLI
                raise ValueError(f"{self.where}: cannot commit, {len(missing)} tensor(s) unfinished, e.g. {missing[0]!r}")
            tensors = {n: record_from(m, done[n], self.chunk_digests(n)) for n, m in self.metas.items()}
        carried = {}
        with storage_errors(self.where):
            files_dir = os.path.join(self.staging_dir, "files")
            os.makedirs(files_dir, exist_ok=True)
            for name, content in (files or {}).items():
                data = content if isinstance(content, bytes) else open(content, "rb").read()
                with open(os.path.join(files_dir, name), "wb") as f:
                    f.write(data)
                carried[name] = checksum_bytes(data)
            self.payload.seal()
            if tensors:   # identical tensors and coded blocks stored once across the store (store/dedup.py)
                dedup_staged(self.store.root, self.staging_dir, {n: r.checksum for n, r in tensors.items()})
                dedup_blocks(self.store.root, self.staging_dir)
            dedup_blocks(self.store.root, self.staging_dir, "files")   # and carried files (config, tokenizer)
            fsync_tree(self.staging_dir)  # every chunk durable before the manifest exists
        manifest = Manifest(kind=kind, tensors=tensors, files=carried, parents=list(parents), source=source,
                            recipe=recipe, run=dict(run or {}), created_at=now_utc(),
                            tool={"name": "tensorstore_llm", "version": __version__},
                            shards=shards, info=dict(info or {}), info_schema=schema)
        try:
            return self.store._publish(self.staging_dir, manifest)
        finally:
            self._release()

    def close(self) -> None:
        """Stop writing but keep the staging directory, so the same job can resume later."""
        self.payload.close()
        self._release()

    def abort(self) -> None:
        """Throw away everything staged."""
        self.close()
        remove_tree(self.staging_dir)

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def job_key(*parts) -> str:
    """A stable staging-directory name for a job from its identifying parts."""
    return "job-" + hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
