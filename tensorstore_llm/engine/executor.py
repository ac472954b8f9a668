"""The executor: streams a plan's jobs through an op, block by block, within a memory budget.

Three stages overlap: a reader thread reads the next block's inputs, the calling thread moves the
current block to the compute device, casts it to fp32 and runs the kernel, and a writer thread
writes the previous result and checksums it. Each queue holds one block, so the memory held is a
small multiple of one block, and the block size is chosen from ``max_memory`` — never from the
size of the tensor or the model. Tensors the sink already finished (its journal) are skipped,
which is all that resuming takes: every block is a pure function of its inputs and its seed.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import torch

from ..dtypes import by_name
from ..errors import TsllmError
from ..io.base import TensorSink
from ..ops.registry import OpContext, get_op
from ..units import parse_size
from .plan import Plan, TensorJob
from .progress import Progress

IN_BLOCKS_HELD = 3    # being read, queued, being computed
OUT_BLOCKS_HELD = 3   # being produced, queued, being written
_DONE = object()


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else must name an available device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TsllmError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu or auto")
    return dev


class Executor:
    """Runs ``plan`` into ``sink``.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; decided once, here.
        max_memory: budget for tensor data held by the engine (e.g. ``"512M"``); interpreter and
            libraries come on top.
        seed: run seed for ops that draw random numbers.
        compute_dtype: dtype kernels compute in (fp32 by default).
    Example:
        >>> Executor(plan, sink, max_memory="1G").run()     # doctest: +SKIP
    """

    def __init__(self, plan: Plan, sink: TensorSink | None = None, *, device="auto", max_memory="2G",
                 seed: int = 0, progress: bool | None = None, compute_dtype: str = "float32",
                 desc: str = "tsllm"):
        self.plan = plan
        self.sink = sink
        self.device = resolve_device(device)
        self.budget = parse_size(max_memory)
        self.seed = int(seed)
        self.compute_dtype = by_name(compute_dtype).torch
        self.progress_enabled = progress
        self.desc = desc
        self.computed: list[str] = []
        self.skipped: list[str] = []

    # -- planning -------------------------------------------------------------------------------
    def _bytes_per_row(self, job: TensorJob) -> tuple[int, int]:
        spec = get_op(job.op)
        metas = [self.plan.input_meta(r) for r in job.refs()]
        in_row = sum(m.row_numel * by_name(m.dtype).itemsize for m in metas)
        out_row = job.output.row_numel * by_name(job.output.dtype).itemsize
        compute = job.output.row_numel * 4 * (len(metas) + spec.temps) if spec.compute else 0
        return IN_BLOCKS_HELD * in_row + compute + OUT_BLOCKS_HELD * out_row, in_row

    def block_rows(self, job: TensorJob) -> int:
        """Rows per block for ``job``: as many as the budget allows, aligned to the sink's chunks."""
        meta = job.output
        if not get_op(job.op).rowwise or not meta.shape:
            return meta.rows
        per_row, _ = self._bytes_per_row(job)
        rows = max(1, min(meta.rows, self.budget // max(per_row, 1)))
        align = self.sink.preferred_rows(meta) if self.sink is not None else 1
        if rows < meta.rows and rows > align:
            rows -= rows % align
        return rows

    def estimate(self) -> Estimate:
        """Blocking, I/O and memory of every job, without reading or writing anything."""
        out = []
        for job in self.plan.jobs:
            rows = self.block_rows(job)
            per_row, in_row = self._bytes_per_row(job)
            blocks = -(-job.output.rows // rows) if job.output.numel else 0
            out.append(JobEstimate(job, rows, blocks, per_row * rows, in_row * job.output.rows))
        return Estimate(out, self.budget)

    # -- running --------------------------------------------------------------------------------
    def run(self) -> dict[str, str]:
        """Compute every job not already finished in the sink. Returns output name -> checksum."""
        if self.sink is None:
            raise ValueError("Executor.run needs a sink")
        self.sink.prepare([j.output for j in self.plan.jobs])
        results = dict(self.sink.completed())
        todo = [j for j in self.plan.jobs if j.output.name not in results]
        self.skipped = [j.output.name for j in self.plan.jobs if j.output.name in results]
        total = sum(j.output.nbytes for j in self.plan.jobs)
        progress = Progress(total, self.desc, self.progress_enabled, initial=total - sum(j.output.nbytes for j in todo))
        pipeline = _Pipeline()
        reader = threading.Thread(target=pipeline.guard, args=(self._read_all, todo, pipeline), daemon=True)
        writer = threading.Thread(target=pipeline.guard, args=(self._write_all, results, pipeline, progress), daemon=True)
        reader.start()
        writer.start()
        try:
            while True:
                item = pipeline.get(pipeline.inputs)
                if item is _DONE:
                    break
                job, start, stop, tensors, last = item
                result = self._compute(job, start, stop, tensors) if tensors is not None else None
                pipeline.put(pipeline.outputs, (job, start, result, last))
            pipeline.put(pipeline.outputs, _DONE)
            writer.join()
        except BaseException:
            pipeline.stop.set()
            raise
        finally:
            reader.join()
            writer.join()
            progress.close()
        pipeline.raise_error()
        return {j.output.name: results[j.output.name] for j in self.plan.jobs}

    def _read_all(self, todo: list[TensorJob], pipeline: _Pipeline) -> None:
        for job in todo:
            meta = job.output
            if meta.numel == 0:
                pipeline.put(pipeline.inputs, (job, 0, 0, None, True))
                continue
            rows = self.block_rows(job)
            for start in range(0, meta.rows, rows):
                stop = min(meta.rows, start + rows)
                tensors = {}
                for role, refs in job.inputs:
                    if isinstance(refs, tuple):
                        tensors[role] = [self._read(r, start, stop) for r in refs]
                    else:
                        tensors[role] = self._read(refs, start, stop)
                if not pipeline.put(pipeline.inputs, (job, start, stop, tensors, stop == meta.rows)):
                    return
        pipeline.put(pipeline.inputs, _DONE)

    def _read(self, ref, start, stop):
        return self.plan.sources[ref.source].read_rows(ref.name, start, stop)

    def _compute(self, job: TensorJob, start: int, stop: int, tensors: dict):
        spec = get_op(job.op)
        out_dtype = by_name(job.output.dtype).torch
        ctx = OpContext(job.op, job.output.name, job.output.shape, start, stop, self.seed, self.device)
        if spec.compute:
            tensors = {role: ([self._to_compute(t) for t in v] if isinstance(v, list) else self._to_compute(v))
                       for role, v in tensors.items()}
        result = spec.fn(ctx, job.params, **tensors)
        result = result.to(dtype=out_dtype).to("cpu")
        expected = (stop - start, *job.output.shape[1:]) if job.output.shape else ()
        if tuple(result.shape) != expected:
            raise TsllmError(f"op {job.op!r} returned shape {tuple(result.shape)} for tensor {job.output.name!r} rows {start}:{stop}, expected {expected}")
        if stop == job.output.rows:
            self.computed.append(job.output.name)
        return result.contiguous()

    def _to_compute(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.compute_dtype)

    def _write_all(self, results: dict, pipeline: _Pipeline, progress: Progress) -> None:
        while True:
            item = pipeline.get(pipeline.outputs)
            if item is _DONE:
                return
            job, start, block, last = item
            if block is not None:
                self.sink.write_rows(job.output.name, start, block)
                progress.update(block.numel() * block.element_size())
            if last:
                results[job.output.name] = self.sink.finish(job.output.name)


class _Pipeline:
    """Two one-slot queues, a stop flag, and the first error raised by any stage."""

    def __init__(self):
        self.inputs: queue.Queue = queue.Queue(maxsize=1)
        self.outputs: queue.Queue = queue.Queue(maxsize=1)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as e:  # handed to the main thread
            self.errors.append(e)
            self.stop.set()

    def put(self, q: queue.Queue, item) -> bool:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def get(self, q: queue.Queue):
        while True:
            if self.stop.is_set():
                self.raise_error()
                raise TsllmError("stopped")
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                continue

    def raise_error(self) -> None:
        if self.errors:
            raise self.errors[0]
