"""Resumable staging for the small outputs of LoRA jobs: factors and per-module records.

Extraction, SVD initialisation and a TIES / DARE re-factoring compute per-module factors that are
post-processed (truncated, folded, assembled) before the adapter artifact is committed. They are
staged in the store like any other job's tensors: a :class:`StagedFactorSink` writes each output
into a staging directory keyed by everything that decides the factors, journals it when it is
finished, and a re-run of the same job after a kill (even ``kill -9``) re-checks the journaled
tensors and computes only the rest. Used as a context manager around the computation and the
commit of what it feeds, the sink removes its staging at the end (or on an error), and keeps it
on an interruption.

Example:
    >>> key = ("lora-extract", base.identity, ft.identity, rank, seed)  # doctest: +SKIP
    >>> with StagedFactorSink(store, key) as sink:  # doctest: +SKIP
    ...     Executor(plan, sink).run(); A = sink.tensors["layers.0.q_proj.A"]; commit(...)
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ..dtypes import by_name, from_bytes
from ..io.base import TensorMeta, check_tensor_name
from ..io.staged import StagedSink
from ..store.store import ArtifactWriter, Store, job_key


class _FlatSink(StagedSink):
    """Staged factors as one raw little-endian file per output under ``<staging>/factors``.

    Journaled and re-verified on resume like every staged sink (:class:`StagedSink`); never
    published, so no zarr layout and no fdatasync: a file torn by a crash fails its journaled
    checksum on resume and is recomputed. One file per output keeps the staging of a model's
    few hundred small factors cheap to write and to remove.
    """

    def _prepare_storage(self, metas: list[TensorMeta]) -> None:
        for meta in metas:
            check_tensor_name(meta.name, self.where)
        os.makedirs(os.path.join(self.staging_dir, "factors"), exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.staging_dir, "factors", name)

    def _write_block(self, meta: TensorMeta, start: int, block, raw) -> None:
        offset = start * meta.row_numel * by_name(meta.dtype).itemsize if meta.shape else 0
        path = self._path(meta.name)
        with open(path, "r+b" if start and os.path.exists(path) else "wb") as f:
            f.seek(offset)
            f.write(raw)

    def _read_back(self, meta: TensorMeta, start: int, stop: int):
        row_bytes = meta.row_numel * by_name(meta.dtype).itemsize
        with open(self._path(meta.name), "rb") as f:
            f.seek(start * row_bytes)
            data = bytearray(f.read((stop - start) * row_bytes if meta.shape else row_bytes))
        return from_bytes(data, meta.dtype, (stop - start, *meta.shape[1:]) if meta.shape else ())


class _StagedTensors(Mapping):
    """The finished outputs of a :class:`StagedFactorSink`, read back from its staging on access."""

    def __init__(self, sink: StagedFactorSink):
        self._sink = sink

    def __getitem__(self, name: str) -> torch.Tensor:
        meta = self._sink.metas[name]
        if name not in self._sink.completed():
            raise KeyError(name)
        value = self._sink.writer.payload._read_back(meta, 0, meta.shape[0] if meta.shape else 0)
        return value.reshape(meta.shape).to(by_name(meta.dtype).torch)

    def __iter__(self):
        return iter(self._sink.completed())

    def __len__(self) -> int:
        return len(self._sink.completed())


class StagedFactorSink:
    """A TensorSink staging small outputs in ``store`` under a job key (resumable, journaled).

    ``key_parts`` must name everything that decides the outputs besides their names, shapes and
    dtypes (which :meth:`prepare` adds): source identities, ranks, seed, device type. The
    staging directory is created at :meth:`prepare`, when the outputs are known. ``tensors``
    maps each finished output to its value; ``resumed`` lists the outputs a previous run had
    finished.
    """

    def __init__(self, store: Store, key_parts: tuple):
        self.store = store
        self.key_parts = key_parts
        self.writer: ArtifactWriter | None = None
        self.metas: dict[str, TensorMeta] = {}
        self.resumed: list[str] = []
        self.tensors = _StagedTensors(self)

    def prepare(self, metas) -> None:
        metas = list(metas)
        self.metas = {m.name: m for m in metas}
        key = job_key("lora-factors", list(self.key_parts), [[m.name, list(m.shape), m.dtype] for m in metas])
        self.writer = self.store.create_with(key, _FlatSink)
        self.writer.prepare(metas)
        self.resumed = sorted(self.writer.completed())

    def preferred_rows(self, meta: TensorMeta) -> int:
        return self.writer.preferred_rows(meta)

    def completed(self) -> dict[str, str]:
        return self.writer.completed() if self.writer is not None else {}

    def write_rows(self, name: str, start: int, block) -> None:
        self.writer.write_rows(name, start, block)

    def finish(self, name: str) -> str:
        return self.writer.finish(name)

    def close(self) -> None:
        """Stop writing, keep the staging (an interrupted job resumes from it)."""
        if self.writer is not None:
            self.writer.close()

    def abort(self) -> None:
        """Throw the staging away (a failure that is not an interruption)."""
        if self.writer is not None:
            self.writer.abort()

    def discard(self) -> None:
        """Remove the staging once its outputs are committed elsewhere (the adapter artifact)."""
        self.abort()

    def __enter__(self) -> StagedFactorSink:
        return self

    def __exit__(self, kind, error, tb) -> None:
        """The store's rule for every job: an interruption keeps the staging to resume from, any
        other failure removes it, and so does success (the outputs are committed by then)."""
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            self.close()
        else:
            self.discard()


__all__ = ["StagedFactorSink"]
