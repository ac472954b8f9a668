"""Resumable staging for the small outputs of LoRA jobs: factors and per-module records.

Extraction, SVD initialisation and a TIES / DARE re-factoring compute per-module factors that are
post-processed (truncated, folded, assembled) before the adapter artifact is committed. They are
staged in the store like any other job's tensors: a :class:`StagedFactorSink` writes each output
into a staging directory keyed by everything that decides the factors, journals it when it is
finished, and a re-run of the same job after a kill (even ``kill -9``) re-checks the journaled
tensors and computes only the rest. Once the adapter is committed, :meth:`StagedFactorSink.discard`
removes the staging directory.

Example:
    >>> sink = StagedFactorSink(store, ("lora-extract", base.identity, ft.identity, rank, seed, "cpu"))  # doctest: +SKIP
    >>> Executor(plan, sink).run(); A = sink.tensors["layers.0.q_proj.A"]; sink.discard()           # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..dtypes import by_name
from ..io.base import TensorMeta
from ..io.zarr_tensors import ZarrTensorSource
from ..store.store import ArtifactWriter, Store, job_key


class _StagedTensors(Mapping):
    """The finished outputs of a :class:`StagedFactorSink`, read back from its staging on access."""

    def __init__(self, sink: StagedFactorSink):
        self._sink = sink

    def __getitem__(self, name: str) -> torch.Tensor:
        meta = self._sink.metas[name]
        if name not in self._sink.completed():
            raise KeyError(name)
        source = ZarrTensorSource(self._sink.writer.staging_dir, {name: meta}, "")
        value = source.read_rows(name, 0, meta.shape[0]) if meta.shape else source.read_rows(name, 0, 0)
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
        self.writer = self.store.create(key)
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


def run_staged(step, sink: StagedFactorSink):
    """``step()`` (an executor run into ``sink``): an interruption keeps the staging to resume
    from, any other failure removes it (the store's rule for every job, see ``runs.run_plan``)."""
    try:
        return step()
    except KeyboardInterrupt:
        sink.close()
        raise
    except BaseException:
        sink.abort()
        raise


__all__ = ["StagedFactorSink", "run_staged"]
