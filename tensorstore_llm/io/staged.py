"""What every sink shares: a staging directory, in-order checksums, and a resume journal.

A subclass says how a block lands in storage (``_write_block``), how to read rows back
(``_read_back``, used to re-verify journaled tensors on resume) and how the staging directory is
published (``commit``, which makes it durable first).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from ..dtypes import raw_bytes
from .base import ChunkDigests, RowHasher, TensorMeta, digest_rows
from .fsutil import remove_tree, storage_errors
from .journal import Journal

JOURNAL_NAME = "journal.jsonl"
PARALLEL_HASH_BYTES = 1 << 20


class StagedSink:
    """Base class of sinks that stage into a directory and publish it atomically."""

    def __init__(self, staging_dir: str, where: str):
        self.staging_dir = staging_dir
        self.where = where
        with storage_errors(where):
            os.makedirs(staging_dir, exist_ok=True)
        self.journal = Journal(os.path.join(staging_dir, JOURNAL_NAME))
        self.metas: dict[str, TensorMeta] = {}
        self._hashers: dict[str, RowHasher] = {}
        self._verified: dict[str, str] | None = None   # journaled by an earlier run, re-checked
        self._finished: dict[str, str] = {}             # finished by this sink
        self._chunks: dict[str, ChunkDigests | None] = {}
        self._hash_pool: ThreadPoolExecutor | None = None   # hashes a block while it is written

    def prepare(self, metas: Iterable[TensorMeta]) -> None:
        """Declare every tensor that will be written (shapes and dtypes) before the first block."""
        self.metas = {m.name: m for m in metas}
        with storage_errors(self.where):
            self._prepare_storage(list(self.metas.values()))

    def completed(self) -> dict[str, str]:
        """Tensors finished by an earlier, interrupted run of the same job: name -> checksum.

        Each journaled tensor is read back and kept only if its bytes still hash to the journaled
        checksum (computed once per sink, on first call).
        """
        if self._verified is None:
            self._verified = {}
            for name, checksum in self.journal.completed().items():
                if name in self.metas and name not in self._finished:
                    back = self._digest_back(self.metas[name])
                    if back is not None and back[0] == checksum:
                        self._verified[name] = checksum
                        self._chunks[name] = back[1]
        return {**self._verified, **self._finished}

    def chunk_digests(self, name: str) -> ChunkDigests | None:
        """The per-chunk digests of finished tensor ``name`` (None for sinks without chunks)."""
        return self._chunks.get(name)

    def chunk_rows(self, meta: TensorMeta) -> int | None:
        """Rows per storage chunk to digest separately, or None when the format has no chunks."""
        return None

    def _digest_back(self, meta: TensorMeta) -> tuple[str, ChunkDigests | None] | None:
        try:
            return digest_rows(meta, lambda a, b: self._read_back(meta, a, b), self.where, self.chunk_rows(meta))
        except Exception:  # anything unreadable is simply recomputed
            return None

    def preferred_rows(self, meta: TensorMeta) -> int:
        """Row granularity that writes whole storage chunks (blocks should be multiples of it)."""
        return 1

    def write_rows(self, name: str, start: int, block) -> None:
        """Write rows ``start:start+len(block)`` of tensor ``name``; blocks must come in order."""
        meta = self.metas[name]
        hasher = self._hashers.get(name)
        if hasher is None:
            hasher = self._hashers[name] = RowHasher(meta, self.where, self.chunk_rows(meta))
        raw = raw_bytes(block)
        rows = block.shape[0] if block.dim() else 1
        # hashing and writing both release the GIL: run them side by side
        if len(raw) >= PARALLEL_HASH_BYTES and self._hash_pool is None:
            self._hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tsllm-hash")
        hashed = self._hash_pool.submit(hasher.update, start, raw, rows) if len(raw) >= PARALLEL_HASH_BYTES else None
        try:
            with storage_errors(self.where):
                self._write_block(meta, start, block, raw)
        finally:
            if hashed is not None:
                hashed.result()
        if hashed is None:
            hasher.update(start, raw, rows)

    def finish(self, name: str) -> str:
        """Close tensor ``name``: journal it and return its checksum."""
        meta = self.metas[name]
        hasher = self._hashers.pop(name, None) or RowHasher(meta, self.where, self.chunk_rows(meta))
        digest = hasher.hexdigest()
        with storage_errors(self.where):
            self._finish_tensor(meta)
            self.journal.record(name, digest)
        self._finished[name] = digest
        self._chunks[name] = hasher.chunk_digests()
        return digest

    def close(self) -> None:
        """Stop writing but keep the staging directory, so the same job can resume later."""
        self.journal.close()
        self.stop_hashing()

    def stop_hashing(self) -> None:
        """Let the hashing thread go (a later block starts a new one)."""
        if self._hash_pool is not None:
            self._hash_pool.shutdown()
            self._hash_pool = None

    def abort(self) -> None:
        """Throw away everything staged; the destination is left as it was."""
        self.close()
        remove_tree(self.staging_dir)

    # -- for subclasses -------------------------------------------------------------------------
    def _prepare_storage(self, metas: list[TensorMeta]) -> None:
        raise NotImplementedError

    def _write_block(self, meta: TensorMeta, start: int, block, raw: memoryview) -> None:
        raise NotImplementedError

    def _finish_tensor(self, meta: TensorMeta) -> None:
        """Hook run when a tensor's last block is written."""

    def _read_back(self, meta: TensorMeta, start: int, stop: int):
        raise NotImplementedError
