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
    job: TensorJob
    block_rows: int
    blocks: int
    peak_bytes: int        # memory this job's blocks hold at once
    read_bytes: int


@dataclass(frozen=True)
class Estimate:
    """What a plan will do: per-job blocking, total I/O and the peak memory it needs."""

    jobs: list[JobEstimate]
    budget: int

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
