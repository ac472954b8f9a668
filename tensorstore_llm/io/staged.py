"""What every sink shares: a staging directory, in-order checksums, and a resume journal.

A subclass says how a block lands in storage (``_write_block``), how a finished tensor is made
durable (``_make_durable``) and how the staging directory is published (``commit``).
"""
from __future__ import annotations

import os
from typing import Iterable

from ..dtypes import raw_bytes
from .base import RowHasher, TensorMeta
from .fsutil import remove_tree, storage_errors
from .journal import Journal

JOURNAL_NAME = "journal.jsonl"


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

    def prepare(self, metas: Iterable[TensorMeta]) -> None:
        """Declare every tensor that will be written (shapes and dtypes) before the first block."""
        self.metas = {m.name: m for m in metas}
        with storage_errors(self.where):
            self._prepare_storage(list(self.metas.values()))

    def completed(self) -> dict[str, str]:
        """Tensors finished by an earlier, interrupted run of the same job: name -> checksum."""
        return {n: c for n, c in self.journal.completed().items() if n in self.metas}

    def preferred_rows(self, meta: TensorMeta) -> int:
        """Row granularity that writes whole storage chunks (blocks should be multiples of it)."""
        return 1

    def write_rows(self, name: str, start: int, block) -> None:
        """Write rows ``start:start+len(block)`` of tensor ``name``; blocks must come in order."""
        meta = self.metas[name]
        hasher = self._hashers.setdefault(name, RowHasher(meta, self.where))
        raw = raw_bytes(block)
        rows = block.shape[0] if block.dim() else 1
        with storage_errors(self.where):
            self._write_block(meta, start, block, raw)
        hasher.update(start, raw, rows)

    def finish(self, name: str) -> str:
        """Close tensor ``name``: make it durable, journal it, and return its checksum."""
        hasher = self._hashers.pop(name, None) or RowHasher(self.metas[name], self.where)
        digest = hasher.hexdigest()
        with storage_errors(self.where):
            self._make_durable(self.metas[name])
            self.journal.record(name, digest)
        return digest

    def close(self) -> None:
        """Stop writing but keep the staging directory, so the same job can resume later."""
        self.journal.close()

    def abort(self) -> None:
        """Throw away everything staged; the destination is left as it was."""
        self.close()
        remove_tree(self.staging_dir)

    # -- for subclasses -------------------------------------------------------------------------
    def _prepare_storage(self, metas: list[TensorMeta]) -> None:
        raise NotImplementedError

    def _write_block(self, meta: TensorMeta, start: int, block, raw: memoryview) -> None:
        raise NotImplementedError

    def _make_durable(self, meta: TensorMeta) -> None:
        raise NotImplementedError
