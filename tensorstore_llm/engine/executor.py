"""The executor: streams a plan's jobs through an op, block by block, within a memory budget.

Three stages overlap: a reader thread reads the next block's inputs (and, on a GPU, uploads them
on its own stream), the calling thread casts the current block to fp32 and runs the kernel, and
a writer thread writes the previous result and checksums it. Each queue holds one block, so the
memory held is a small multiple of one block, and the block size is chosen from ``max_memory`` — never from the
size of the tensor or the model. Tensors the sink already finished (its journal) are skipped,
which is all that resuming takes: every block is a pure function of its inputs and its seed.
"""
from __future__ import annotations

import json
import math
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..dtypes import by_name
from ..errors import InvalidParameter, OpError
from ..io.base import TensorSink
from ..ops.registry import OpContext, get_op
from ..seeding import RNG_GROUP_ELEMENTS
from ..units import format_size, parse_size
from .devices import Uploader, default_tile_workers, resolve_device
from .memory import BlockBuffers, tune_allocator
from .pipeline import DONE, Pipeline
from .plan import ROWS, WHOLE, Plan, TensorJob
from .progress import Progress

IN_BLOCKS_HELD = 3    # being read, queued, being computed
OUT_BLOCKS_HELD = 3   # being produced, queued, being written
TILE_ELEMENTS_CPU = RNG_GROUP_ELEMENTS  # 2^19: fp32 temps of 2 MiB (cache-sized, below the mmap threshold)
TILE_ELEMENTS_CUDA = 1 << 26


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


class Executor:
    """Runs ``plan`` into ``sink``.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; decided once, here.
        max_memory: budget for tensor data held by the engine (e.g. ``"512M"``); interpreter and
            libraries come on top.
        seed: run seed for ops that draw random numbers.
        compute_dtype: dtype kernels compute in (fp32 by default).
        tile_workers: threads computing row tiles at once (CPU; default: the usable cores, <= 8).
    Example:
        >>> Executor(plan, sink, max_memory="1G").run()     # doctest: +SKIP
    """

    def __init__(self, plan: Plan, sink: TensorSink | None = None, *, device="auto", max_memory="2G",
                 seed: int = 0, progress: bool | None = None, compute_dtype: str = "float32",
                 desc: str = "tsllm", tile_workers: int | None = None, records_path: str | None = None):
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
        self.records: dict[str, dict] = {}  # reduction job name -> its statistics
        # finished reductions are journaled here (JSON lines), so a re-run skips them
        self.records_path = records_path
        if records_path and os.path.exists(records_path):
            with open(records_path, "rb") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        self.records[str(entry["name"])] = dict(entry["record"])
                    except (ValueError, KeyError, TypeError):
                        continue   # a line torn by a kill
        self._stats: dict | None = None     # statistics of the job being computed (main thread only)
        self._partials: list = []
        # pinned output buffers on a GPU: device-to-host copies into them run at full bus speed
        self._outputs = BlockBuffers(OUT_BLOCKS_HELD, pinned=self.device.type == "cuda")
        self._uploader = Uploader(self.device) if self.device.type == "cuda" else None
        self._pool: ThreadPoolExecutor | None = None
        # random groups of a large (GPU) tile are drawn in parallel on threads of this executor's own
        self._draw_pool = (ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="tsllm-draw")
                           if self.device.type == "cuda" else None)
        # CPU kernels run on row tiles in parallel, each tile on one core, results placed and
        # folded in tile order (so results do not depend on the worker count)
        self.tile_workers = tile_workers or (default_tile_workers() if self.device.type == "cpu" else 1)
        plan.validate()
        self.check_budget()

    # -- planning -------------------------------------------------------------------------------
    def tile_rows(self, job: TensorJob) -> int:
        """Rows per kernel call: about TILE_ELEMENTS outputs, so fp32 temporaries stay in cache."""
        tile = TILE_ELEMENTS_CUDA if self.device.type == "cuda" else TILE_ELEMENTS_CPU
        return max(1, tile // max(1, job.output.row_numel))

    def _memory_model(self, job: TensorJob) -> tuple[int, int, int]:
        """(bytes per block row held by the pipeline, fixed bytes of the kernel calls in flight, input bytes per row)."""
        spec = get_op(job.op)
        metas = [self.plan.input_meta(r) for r in job.refs() if r.relation == ROWS]
        in_row = sum(m.row_numel * by_name(m.dtype).itemsize for m in metas)
        row_outputs = [] if job.reduce_only else [job.output, *(m for m in job.extra_outputs if job.row_aligned(m))]
        out_row = sum(m.row_numel * by_name(m.dtype).itemsize for m in row_outputs)
        if not spec.compute:
            return IN_BLOCKS_HELD * in_row + OUT_BLOCKS_HELD * out_row, 0, in_row
        eager = sum(1 for _role, refs in job.inputs if not isinstance(refs, tuple) and refs.relation == ROWS)
        temps = spec.temps(len(metas)) if callable(spec.temps) else spec.temps
        fp32_row = job.output.row_numel * 4 * (eager + temps)
        if not spec.rowwise or not job.output.shape:
            return IN_BLOCKS_HELD * in_row + OUT_BLOCKS_HELD * out_row + fp32_row, 0, in_row
        return IN_BLOCKS_HELD * in_row + OUT_BLOCKS_HELD * out_row, fp32_row * self.tile_rows(job) * self.tile_workers, in_row

    def whole_bytes(self, job: TensorJob) -> int:
        """Bytes held for the whole of ``job``: its WHOLE inputs (as stored, plus the fp32 copy
        the kernel reads) and the outputs that are not split into row blocks."""
        spec = get_op(job.op)
        total = 0
        for ref in job.refs():
            if ref.relation == WHOLE:
                meta = self.plan.input_meta(ref)
                total += meta.nbytes + (meta.numel * 4 if spec.compute else 0)
        for meta in job.extra_outputs:
            if not job.row_aligned(meta):
                total += meta.nbytes + meta.numel * 4
        return total

    def min_block_bytes(self, job: TensorJob) -> int:
        """Memory the smallest block of ``job`` holds: one row with one tile of temporaries (the
        whole tensor for ops that cannot be split; 0 for an empty tensor, which is never read)."""
        if job.output.numel == 0:
            return 0
        per_row, tile_bytes, _ = self._memory_model(job)
        if not get_op(job.op).rowwise or not job.output.shape:
            return per_row * job.output.rows + self.whole_bytes(job)
        return per_row + tile_bytes // (self.tile_rows(job) * self.tile_workers) + self.whole_bytes(job)

    def check_budget(self) -> None:
        """Refuse, before anything is read or allocated, a job whose smallest block exceeds the budget.

        Blocks are whole rows: a row is never split into columns, so a row larger than the budget
        (e.g. a ``[1, 2**31]`` fp32 tensor at 64 MiB) cannot be streamed within it. Raises
        InvalidParameter (exit 7) naming the tensor, its input and the bytes the run would need.
        """
        for job in self.plan.jobs:
            need = self.min_block_bytes(job)
            if need > self.budget:
                meta = job.output
                unit = "one row" if get_op(job.op).rowwise and meta.shape else "the whole tensor"
                inputs = sorted({str(getattr(self.plan.sources[r.source], "path", r.source)) for r in job.refs()})
                origin = f" (from {', '.join(inputs[:2])})" if inputs else ""
                raise InvalidParameter(f"tensor {meta.name!r}{origin} of shape {list(meta.shape)} {meta.dtype}: {unit} of "
                                  f"op {job.op!r} needs {format_size(need)} ({need} bytes) in memory at once, more than "
                                  f"the budget of {format_size(self.budget)} ({self.budget} bytes); rows are not split "
                                  f"into columns, so give --max-memory {need} or more")

    def block_rows(self, job: TensorJob) -> int:
        """Rows per block for ``job``: as many as the budget allows, aligned to the sink's chunks.

        A block of R rows holds ``R * per_row`` in the pipeline plus one kernel tile of
        ``min(R, tile)`` rows of fp32 temporaries. On a GPU the uploaded input blocks must also
        fit in half of the device memory that was free when the run started.
        """
        meta = job.output
        if not get_op(job.op).rowwise or not meta.shape:
            return meta.rows
        per_row, tile_bytes, in_row = self._memory_model(job)
        tile = self.tile_rows(job)
        fp32_row = tile_bytes // tile
        budget = self.budget - self.whole_bytes(job)
        if budget >= tile * (per_row + fp32_row):
            rows = (budget - tile_bytes) // max(per_row, 1)
        else:
            rows = budget // max(per_row + fp32_row, 1)
        if self._uploader is not None:
            rows = min(rows, (self._uploader.free_bytes // 2 - tile_bytes) // max(IN_BLOCKS_HELD * in_row, 1))
        rows = max(1, min(meta.rows, rows))
        align = self.sink.preferred_rows(meta) if self.sink is not None else 1
        for ref in (r for r in job.refs() if r.relation == ROWS):   # whole verified chunks: none read twice
            source_rows = getattr(self.plan.sources[ref.source], "preferred_rows", None)
            align = math.lcm(align, source_rows(ref.name) if source_rows else 1)
        if rows < meta.rows and rows > align:
            rows -= rows % align
        return rows

    def estimate(self) -> Estimate:
        """Blocking, I/O and memory of every job, without reading or writing anything."""
        out = []
        for job in self.plan.jobs:
            rows = self.block_rows(job)
            per_row, fixed, in_row = self._memory_model(job)
            blocks = -(-job.output.rows // rows) if job.output.numel else 0
            tile = self.tile_rows(job)
            # the tiles of one block in flight at once: up to tile_workers of min(rows, tile) rows
            tile_rows_alive = min(rows, tile) * min(self.tile_workers, -(-rows // tile))
            peak = per_row * rows + fixed // (tile * self.tile_workers) * tile_rows_alive + self.whole_bytes(job)
            whole_read = sum(self.plan.input_meta(r).nbytes for r in job.refs() if r.relation == WHOLE)
            out.append(JobEstimate(job, rows, blocks, peak, in_row * job.output.rows + whole_read))
        return Estimate(out, self.budget)

    # -- running --------------------------------------------------------------------------------
    def run(self) -> dict[str, str]:
        """Compute every job not already finished in the sink. Returns output name -> checksum."""
        if self.sink is None and any(j.outputs() for j in self.plan.jobs):
            raise ValueError("Executor.run needs a sink")
        tune_allocator()
        intra_op_threads = torch.get_num_threads()
        if self.tile_workers > 1:
            torch.set_num_threads(1)   # the tile workers are the parallelism (torch's setting is process-wide)
        try:
            return self._run()
        finally:
            torch.set_num_threads(intra_op_threads)

    def _run(self) -> dict[str, str]:
        results = {}
        if self.sink is not None:
            self.sink.prepare([m for j in self.plan.jobs for m in j.outputs()])
            results = dict(self.sink.completed())

        def done(job: TensorJob) -> bool:
            if job.reduce_only:
                return job.output.name in self.records
            return all(m.name in results for m in job.outputs())
        todo = [j for j in self.plan.jobs if not done(j)]
        self.skipped = [j.output.name for j in self.plan.jobs if done(j)]
        total = sum(self._progress_bytes(j) for j in self.plan.jobs)
        progress = Progress(total, self.desc, self.progress_enabled, initial=total - sum(self._progress_bytes(j) for j in todo))
        pipeline = Pipeline()
        reader = threading.Thread(target=pipeline.guard, args=(self._read_all, todo, pipeline), daemon=True)
        writer = threading.Thread(target=pipeline.guard, args=(self._write_all, results, pipeline, progress), daemon=True)
        reader.start()
        writer.start()
        try:
            while True:
                block = pipeline.get(pipeline.inputs)
                if block is DONE:
                    break
                job = block.job
                if block.pass_index is not None:
                    self._stats_block(job, block.pass_index, block.start, block.stop, block.tensors, block.last)
                    if job.reduce_only:
                        self._finish_reduction(block, progress)
                    continue
                values = self._compute(job, block.start, block.stop, block.tensors) if block.tensors is not None else None
                pipeline.put(pipeline.outputs, Result(job, block.start, values, block.last))
            pipeline.put(pipeline.outputs, DONE)
            writer.join()
        except BaseException:
            pipeline.stop.set()
            raise
        finally:
            reader.join()
            writer.join()
            progress.close()
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            if self._draw_pool is not None:
                self._draw_pool.shutdown()
                self._draw_pool = None
        pipeline.raise_error()
        return {m.name: results[m.name] for j in self.plan.jobs for m in j.outputs()}

    def _progress_bytes(self, job: TensorJob) -> int:
        if job.reduce_only:
            return sum(self.plan.input_meta(r).nbytes for r in job.refs())
        return sum(m.nbytes for m in job.outputs())

    def _finish_reduction(self, block: Block, progress: Progress) -> None:
        """After a reduction job's blocks: count its progress, and keep the record of its last pass."""
        job = block.job
        passes = get_op(job.op).passes_for(job.params)
        rows = block.stop - block.start
        progress.update(self._progress_bytes(job) * rows // max(1, job.output.rows) // len(passes))
        if block.last and block.pass_index == len(passes) - 1:
            self.records[job.output.name] = dict(self._stats or {})
            self.computed.append(job.output.name)
            if self.records_path:
                line = json.dumps({"name": job.output.name, "record": self.records[job.output.name]}, default=_plain)
                with open(self.records_path, "ab") as f:
                    f.write(line.encode() + b"\n")
                    f.flush()
                    os.fsync(f.fileno())
            self._stats = None

    def _read_all(self, todo: list[TensorJob], pipeline: Pipeline) -> None:
        """Feed blocks in order; a job with statistics passes that spans several blocks is read
        once per pass (``pass_index`` 0..P-1) and once more for the output (``pass_index`` None)."""
        for job in todo:
            meta = job.output
            if meta.numel == 0:
                if job.reduce_only:
                    self.records[meta.name] = {}
                else:
                    pipeline.put(pipeline.inputs, Block(job, None, 0, 0, None, True))
                continue
            rows = self.block_rows(job)
            spec = get_op(job.op)
            passes = len(spec.passes_for(job.params)) if rows < meta.rows or job.reduce_only else 0
            upload = self._uploader is not None and spec.compute
            held: dict = {}   # WHOLE inputs: read once, handed to every block of the job

            def read(ref, start, stop):
                if ref.relation == WHOLE:
                    if ref not in held:
                        held[ref] = self._read(ref, 0, self.plan.input_meta(ref).rows, upload)
                    return held[ref]
                return self._read(ref, start, stop, upload)
            for pass_index in [*range(passes), *([] if job.reduce_only else [None])]:
                for start in range(0, meta.rows, rows):
                    stop = min(meta.rows, start + rows)
                    tensors = {}
                    for role, refs in job.inputs:
                        if isinstance(refs, tuple):
                            tensors[role] = [read(r, start, stop) for r in refs]
                        else:
                            tensors[role] = read(refs, start, stop)
                    if not pipeline.put(pipeline.inputs, Block(job, pass_index, start, stop, tensors, stop == meta.rows)):
                        return
        pipeline.put(pipeline.inputs, DONE)

    def _read(self, ref, start, stop, upload: bool = False):
        block = self.plan.sources[ref.source].read_rows(ref.name, start, stop)
        return self._uploader.upload(block) if upload else block

    def _tiles(self, job: TensorJob, start: int, stop: int, tensors: dict):
        """(tile start, tile stop, tensors of the tile) over the rows of one block."""
        if not get_op(job.op).rowwise or not job.output.shape:
            yield start, stop, tensors
            return
        tile = self.tile_rows(job)
        whole = _whole_roles(job)
        t0 = start
        while t0 < stop:
            # tiles sit at absolute multiples of the tile size, so they coincide with the seeded
            # random row groups (seeding.rng_group_rows) and no group is drawn twice
            t1 = min(stop, (t0 // tile + 1) * tile)
            yield t0, t1, {role: (v if role in whole else
                                  [x[t0 - start:t1 - start] for x in v] if isinstance(v, list) else v[t0 - start:t1 - start])
                           for role, v in tensors.items()}
            t0 = t1

    def _map_tiles(self, fn, tiles):
        """``fn(t0, t1, part)`` of each tile, yielded in tile order; up to ``tile_workers`` at once
        (a bounded window, so only a few results are alive at a time)."""
        if self.tile_workers <= 1:
            for tile in tiles:
                yield fn(*tile)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.tile_workers, thread_name_prefix="tsllm-tile")
        window: deque = deque()
        try:
            for tile in tiles:
                window.append(self._pool.submit(fn, *tile))
                if len(window) >= self.tile_workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()
            for future in window:
                if not future.cancelled():
                    future.exception()  # wait: no worker may still write into this block

    def _stats_block(self, job: TensorJob, pass_index: int, start: int, stop: int, tensors: dict, last: bool) -> None:
        """Run statistics pass ``pass_index`` over one block; reduce after the tensor's last block."""
        spec = get_op(job.op)
        stats_pass = spec.passes_for(job.params)[pass_index]
        if pass_index == 0 and start == 0:
            self._stats, self._partials = None, []
        def one_tile(t0, t1, part):
            return stats_pass.map(self._context(job, t0, t1), job.params, **self._cast(spec, job, part))

        for partial in self._map_tiles(one_tile, self._tiles(job, start, stop, tensors)):
            if stats_pass.fold is not None and self._partials:
                self._partials = [stats_pass.fold(self._partials[0], partial)]
            else:
                self._partials.append(partial)
        if last:
            ctx = self._context(job, 0, job.output.rows)
            self._stats = {**(self._stats or {}), **stats_pass.reduce(job.params, self._partials, ctx)}
            self._partials = []

    def _compute(self, job: TensorJob, start: int, stop: int, tensors: dict) -> dict:
        """The output rows ``start:stop`` of every output of ``job`` (name -> tensor): the kernel
        runs on cache-sized row tiles of the block. WHOLE inputs are cast once per block."""
        spec = get_op(job.op)
        passes = spec.passes_for(job.params)
        if passes and start == 0 and stop == job.output.rows:  # whole tensor in memory: passes run here
            self._stats = None
            for index in range(len(passes)):
                self._stats_block(job, index, start, stop, tensors, True)
        whole = _whole_roles(job)
        if whole and spec.compute:
            cast = self._cast(spec, job, {r: v for r, v in tensors.items() if r in whole})
            tensors = {**tensors, **{r: (list(v) if isinstance(v, _CastOnAccess) else v) for r, v in cast.items()}}
        outputs = job.outputs()
        if not spec.compute or not spec.rowwise or not job.output.shape:
            values = self._as_outputs(job, self._kernel(spec, job, start, stop, tensors))
            values = {m.name: values[m.name].to(dtype=by_name(m.dtype).torch).to("cpu") for m in outputs}
        else:
            values = {m.name: (self._outputs.take if m is job.output else _empty)(
                (stop - start, *m.shape[1:]), by_name(m.dtype).torch) for m in outputs}

            def one_tile(t0, t1, part):
                produced = self._as_outputs(job, self._kernel(spec, job, t0, t1, part))
                for name, buffer in values.items():
                    buffer[t0 - start:t1 - start].copy_(produced[name])  # casts as .to() does
            for _ in self._map_tiles(one_tile, self._tiles(job, start, stop, tensors)):
                pass
        for meta in outputs:
            if job.row_aligned(meta) or meta is job.output:
                expected = (stop - start, *meta.shape[1:]) if meta.shape else ()
            else:
                expected = tuple(meta.shape)
            if tuple(values[meta.name].shape) != expected:
                raise OpError(f"op {job.op!r} returned shape {tuple(values[meta.name].shape)} for tensor {meta.name!r} "
                              f"rows {start}:{stop}, expected {expected}")
        if stop == job.output.rows:
            self.computed.extend(m.name for m in outputs)
            self._stats = None
        return {name: value.contiguous() for name, value in values.items()}

    def _as_outputs(self, job: TensorJob, produced) -> dict:
        """A kernel's result as output name -> tensor (a single tensor is ``job.output``)."""
        if isinstance(produced, dict):
            missing = [m.name for m in job.outputs() if m.name not in produced]
            if missing:
                raise OpError(f"op {job.op!r} returned no tensor for output(s) {missing} of job {job.output.name!r}")
            return produced
        if job.extra_outputs:
            raise OpError(f"op {job.op!r} returned one tensor, but job {job.output.name!r} has "
                          f"{1 + len(job.extra_outputs)} outputs (return a dict name -> tensor)")
        return {job.output.name: produced}

    def _context(self, job: TensorJob, start: int, stop: int) -> OpContext:
        return OpContext(job.op, job.output.name, job.output.shape, start, stop, self.seed, self.device, self._stats,
                         self._draw_pool)

    def _cast(self, spec, job: TensorJob, tensors: dict) -> dict:
        if not spec.compute:
            return tensors
        dtype = self.compute_dtype if job.compute_dtype == "float32" else by_name(job.compute_dtype).torch

        def cast(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device=self.device, dtype=dtype)
        return {role: (_CastOnAccess(v, cast) if isinstance(v, list) else cast(v)) for role, v in tensors.items()}

    def _kernel(self, spec, job: TensorJob, start: int, stop: int, tensors: dict):
        return spec.fn(self._context(job, start, stop), job.params, **self._cast(spec, job, tensors))

    def _write_all(self, results: dict, pipeline: Pipeline, progress: Progress) -> None:
        while True:
            item = pipeline.get(pipeline.outputs)
            if item is DONE:
                return
            job = item.job
            for meta in job.outputs():
                block = (item.values or {}).get(meta.name)
                if block is not None and (job.row_aligned(meta) or meta is job.output or item.last):
                    self.sink.write_rows(meta.name, item.start if meta.shape and (job.row_aligned(meta) or meta is job.output) else 0, block)
                    progress.update(block.numel() * block.element_size())
                    self._outputs.give(block)
                if item.last:
                    results[meta.name] = self.sink.finish(meta.name)


def _plain(value):
    """JSON form of the numbers and tensors a statistics record may hold."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"a reduction record holds {type(value).__name__}, which has no JSON form")


def _whole_roles(job: TensorJob) -> set[str]:
    """Roles of ``job`` whose inputs arrive whole with every block."""
    out = set()
    for role, refs in job.inputs:
        first = refs[0] if isinstance(refs, tuple) and refs else refs
        if not isinstance(first, tuple) and getattr(first, "relation", ROWS) == WHOLE:
            out.add(role)
    return out


def _empty(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


class _CastOnAccess(Sequence):
    """A variadic input: each element moves to the device and compute dtype when it is accessed.

    A kernel that walks its inputs once (a weighted sum) then holds one fp32 copy at a time; one
    that needs them all together takes ``list(inputs)`` and declares the memory in ``temps``.
    """

    def __init__(self, items: list, cast):
        self._items, self._cast = items, cast

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _CastOnAccess(self._items[index], self._cast)
        return self._cast(self._items[index])
