"""Records that travel through the executor's pipeline, and what a plan's estimate reports."""
from __future__ import annotations

from dataclasses import dataclass

from .plan import TensorJob


@dataclass
class Block:
    """One block of a job's inputs on its way from the reader to the compute stage: rows
    ``start:stop`` (WHOLE inputs whole), for statistics pass ``pass_index`` or, when None, for
    the output."""

    job: TensorJob
    pass_index: int | None
    start: int
    stop: int
    tensors: dict | None
    last: bool


@dataclass
class Result:
    """Output rows of one block on their way to the writer: output name -> tensor."""

    job: TensorJob
    start: int
    values: dict | None
    last: bool



@dataclass(frozen=True)
class JobEstimate:
    """Blocking and memory of one job: ``peak_bytes`` is what its own blocks hold at once (three
    input blocks, three output blocks, the kernel tiles in flight, its whole inputs and those of
    the next job when the reader reads one job ahead)."""

    job: TensorJob
    block_rows: int
    blocks: int
    peak_bytes: int        # memory this job's blocks hold at once
    read_bytes: int


@dataclass(frozen=True)
class RssPrediction:
    """The peak resident memory a run is predicted to reach, by part (bytes).

    ``baseline``: what the process holds before the run (interpreter, torch, our modules: measured
    from /proc/self/status, or modelled where it cannot be read); ``runtime``: what running adds
    besides tensor data (code pages of the kernels, thread stacks, allocator arenas; measured
    once, a constant); ``tensors``: the tensor data the pipeline holds at its fullest, from a
    replay of the plan's blocks in run order (input blocks being read, queued and computed, the
    recycled output buffers, kernel tiles in flight, whole inputs).
    """

    baseline: int
    runtime: int
    tensors: int
    baseline_measured: bool = True

    @property
    def total(self) -> int:
        return self.baseline + self.runtime + self.tensors


@dataclass(frozen=True)
class Estimate:
    """What a plan will do: per-job blocking, total I/O and the peak memory it needs."""

    jobs: list[JobEstimate]
    budget: int
    rss: RssPrediction | None = None   # predicted peak RSS of the whole process (None: not computed)

    @property
    def read_bytes(self) -> int:
        return sum(j.read_bytes for j in self.jobs)

    @property
    def write_bytes(self) -> int:
        return sum(j.job.output.nbytes for j in self.jobs)

    @property
    def peak_bytes(self) -> int:
        return max((j.peak_bytes for j in self.jobs), default=0)

    @property
    def over_budget(self) -> list[JobEstimate]:
        return [j for j in self.jobs if j.peak_bytes > self.budget]
