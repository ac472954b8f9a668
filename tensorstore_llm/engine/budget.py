"""The executor's memory model: rows per block from the budget, the smallest block a job needs,
and the estimate a dry run prints.

A mixin of ``Executor`` (it reads the plan, the device, the budget, the tile workers and the sink's
chunking); kept apart so that each module stays small.
"""
from __future__ import annotations

import math
from itertools import pairwise

from ..dtypes import by_name
from ..errors import InvalidParameter
from ..io.zarr_tensors import chunk_shape
from ..ops.registry import get_op
from ..units import format_size
from .memory import HeapGuard, process_rss
from .plan import ROW_RELATIONS, ROWS, WHOLE, TensorJob
from .records import Estimate, JobEstimate, RssPrediction

IN_BLOCKS_HELD = 3    # being read, queued, being computed
WHOLE_JOBS_HELD = 2   # jobs whose WHOLE inputs are alive at once: being computed, and the next one
OUT_BLOCKS_HELD = 3   # being produced, queued, being written
COPY_BLOCKS_ALIVE = 2   # a copy: the block being written and the one being read (measured; the third slot rarely fills)
# A block of an op that does not compute (a copy, a passthrough slice, a gather) has no kernel
# temporaries to amortise: a larger block only adds resident memory (its mapped input pages). Its
# fixed cost, the pipeline's thread hand-offs (~0.4 ms a block on the 2-core VM), is ~10% of the
# per-byte cost (mapping, checksum, write) of 4 MiB (measured on a 1 GB copy: CPU 1.24-1.37 s in
# blocks of 8 MiB, 1.35-1.46 s of 4 MiB, 1.7-1.9 s of 1.3 MiB). 4 MiB is also one direct write
# (io/fsutil.DirectWrites). Rows of a copy's block are capped here, whatever the budget.
COPY_BLOCK_BYTES = 4 << 20
# What a run holds besides tensor data (measured with tests/benchmarks/bench_budget.py, see
# docs/benchmarks.md "Honest budget"): code pages of the kernels and libraries first touched
# while running, thread stacks and malloc arenas of the pipeline threads, and per tile worker
# its arena and the partial records of the statistics passes. With glibc's thread cache on
# (a library caller's process; the CLI turns it off) the arenas hold more: engine/memory.py
# HeapGuard trims them at this ceiling.
RUNTIME_BYTES = 24 << 20
WORKER_BYTES = 8 << 20
CUDA_RUNTIME_BYTES = 600 << 20
BASELINE_BYTES = 230 << 20   # interpreter + torch + tensorstore_llm, where /proc/self/status cannot be read


class MemoryPlanning:
    """How many rows a block of each job may have, and what the plan holds at its peak."""

    def _memory_model(self, job: TensorJob) -> tuple[int, int, int]:
        """(bytes per block row held by the pipeline, fixed bytes of the kernel calls in flight, input bytes per row)."""
        spec = get_op(job.op)
        metas = [self.plan.input_meta(r) for r in job.refs() if r.relation in ROW_RELATIONS]
        in_row, out_row = self._row_bytes(job)
        if not spec.compute:
            return IN_BLOCKS_HELD * in_row + OUT_BLOCKS_HELD * out_row, 0, in_row
        eager = sum(1 for _role, refs in job.inputs if not isinstance(refs, tuple) and refs.relation in ROW_RELATIONS)
        temps = spec.temps(len(metas)) if callable(spec.temps) else spec.temps
        fp32_row = job.output.row_numel * 4 * (eager + temps)
        if not spec.rowwise or not job.output.shape:
            return IN_BLOCKS_HELD * in_row + OUT_BLOCKS_HELD * out_row + fp32_row, 0, in_row
        return IN_BLOCKS_HELD * in_row + OUT_BLOCKS_HELD * out_row, fp32_row * self.tile_rows(job) * self.tile_workers, in_row

    def _row_bytes(self, job: TensorJob) -> tuple[int, int]:
        """(bytes of one row of the ROWS inputs, bytes of one row of the row-split outputs)."""
        metas = [self.plan.input_meta(r) for r in job.refs() if r.relation in ROW_RELATIONS]
        in_row = sum(m.row_numel * by_name(m.dtype).itemsize for m in metas)
        row_outputs = [] if job.reduce_only else [job.output, *(m for m in job.extra_outputs if job.row_aligned(m))]
        return in_row, sum(m.row_numel * by_name(m.dtype).itemsize for m in row_outputs)

    def whole_bytes(self, job: TensorJob) -> int:
        """Bytes held for the whole of ``job``: its WHOLE inputs (as stored, plus the fp32 copy
        the kernel reads), the outputs that are not split into row blocks, and what its sources
        hold beyond the rows they return (``extra_read_bytes``: a delta-stored input's decode
        buffers and read-ahead)."""
        spec = get_op(job.op)
        total = 0
        for ref in job.refs():
            if ref.relation == WHOLE:
                meta = self.plan.input_meta(ref)
                total += meta.nbytes + (meta.numel * 4 if spec.compute else 0)
        total += self.source_extra_bytes(job)
        for meta in job.extra_outputs:
            if not job.row_aligned(meta):
                total += meta.nbytes + meta.numel * 4
        return total

    def whole_input_bytes(self, job: TensorJob) -> int:
        """Bytes of ``job``'s WHOLE inputs as stored: what reading it ahead holds before it computes."""
        return sum(self.plan.input_meta(r).nbytes for r in job.refs() if r.relation == WHOLE)

    @property
    def whole_jobs_held(self) -> int:
        """How many jobs' WHOLE inputs the reader keeps alive at once (engine/pipeline.py).

        2 (the job being computed and the next one, read while it computes) where the budget
        holds the smallest block of every job plus the next job's whole inputs; 1 otherwise: a
        job's whole inputs are read once the previous job's are gone. Either way at most one job
        ahead: the queues alone held three jobs' whole inputs (a whole-tensor op such as
        ``lora_extract`` three modules' bf16 pairs, 132 MiB at 1 GB, whatever the budget).
        """
        if getattr(self, "_whole_next", None) is None:
            jobs = [j for j in self.plan.jobs if j.output.numel]
            following = {id(job): self.whole_input_bytes(after) for job, after in pairwise(jobs)}
            fits = all(self.min_block_bytes(job) + following.get(id(job), 0) <= self.budget
                       for job in jobs if following.get(id(job)))
            self._whole_held = WHOLE_JOBS_HELD if fits else 1
            self._whole_next = following if fits else {}
        return self._whole_held

    def whole_ahead_bytes(self, job: TensorJob) -> int:
        """Bytes of the next job's WHOLE inputs, which the reader may hold while ``job`` runs
        (0 when one job is held at a time)."""
        self.whole_jobs_held   # noqa: B018  (computes the map)
        return self._whole_next.get(id(job), 0)

    def source_extra_bytes(self, job: TensorJob) -> int:
        """What ``job``'s sources hold beyond the rows they return while it reads them."""
        total = 0
        for source, name in {(r.source, r.name) for r in job.refs()}:
            extra = getattr(self.plan.sources[source], "extra_read_bytes", None)
            if extra is not None:
                total += extra(name)
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
        if self.device.type == "cpu":
            for job in self.plan.jobs:
                warm = get_op(job.op).warm
                if warm is not None:
                    warm(job.params)
        self._start_rss = process_rss()
        for job in self.plan.jobs:
            need = self.min_block_bytes(job)
            if need > self.budget:
                meta = job.output
                unit = "one row" if get_op(job.op).rowwise and meta.shape else "the whole tensor"
                inputs = sorted({str(getattr(self.plan.sources[r.source], "path", r.source)) for r in job.refs()})
                origin = f" (from {', '.join(inputs[:2])})" if inputs else ""
                extra = self.source_extra_bytes(job)
                if extra:
                    unit += f" (with {format_size(extra)} of decode buffers of its delta-stored inputs)"
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
        budget = self.budget - self.whole_bytes(job) - self.whole_ahead_bytes(job)
        if budget >= tile * (per_row + fp32_row):
            rows = (budget - tile_bytes) // max(per_row, 1)
        else:
            rows = budget // max(per_row + fp32_row, 1)
        if self._uploader is not None:
            rows = min(rows, (self._uploader.free_bytes // 2 - tile_bytes) // max(IN_BLOCKS_HELD * in_row, 1))
        rows = max(1, min(meta.rows, rows))
        if self.sink is not None:
            align = self.sink.preferred_rows(meta)
        else:   # a dry run: blocks as a store artifact's chunks would align them (the common sink)
            align = 1 if job.reduce_only else chunk_shape(meta)[0]
        for ref in (r for r in job.refs() if r.relation == ROWS):   # whole verified chunks: none read twice
            source_rows = getattr(self.plan.sources[ref.source], "preferred_rows", None)
            align = math.lcm(align, source_rows(ref.name) if source_rows else 1)
        if job.reduce_only or get_op(job.op).passes_for(job.params):
            # statistics add floats per tile: blocks of whole tiles give the same tiles, hence
            # bit-identical statistics, under any budget that holds a tile
            with_tiles = math.lcm(align, tile)
            if rows >= with_tiles:
                align = with_tiles
            elif rows < align and rows >= tile:   # blocks below a chunk: whole tiles at least
                align = tile
        if not get_op(job.op).compute:   # a copy: small blocks (COPY_BLOCK_BYTES), of whole chunks still
            cap = COPY_BLOCK_BYTES // max(in_row, 1)
            rows = min(rows, max(cap - cap % align, align))
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
            peak = (per_row * rows + fixed // (tile * self.tile_workers) * tile_rows_alive + self.whole_bytes(job)
                    + self.whole_ahead_bytes(job))
            whole_read = sum(self.plan.input_meta(r).nbytes for r in job.refs() if r.relation == WHOLE)
            out.append(JobEstimate(job, rows, blocks, peak, in_row * job.output.rows + whole_read))
        return Estimate(out, self.budget, self.predict_rss(out))

    # -- the whole process ------------------------------------------------------------------------
    def predict_rss(self, jobs: list[JobEstimate]) -> RssPrediction:
        """Peak RSS of this process while the plan runs: the baseline it holds now, the runtime
        overhead, and the tensor data of the fullest moment of a replay of the blocks in run order.

        The replay holds, while block k is computed: the inputs of blocks k, k+1 (queued) and k+2
        (being read), the output buffers of blocks k, k-1 (queued) and k-2 (being written) plus
        the free ones kept for reuse, exactly as ``memory.BlockBuffers`` recycles them (a reused
        buffer keeps its size; one that fits nothing drops the free ones), the kernel tiles in
        flight, the job's whole inputs and the next job's (read while it runs, see
        ``whole_jobs_held``). Mapped input pages count here like read ones: a mapped
        file page is resident in this process while its block is alive.
        """
        steps = list(self._replay(jobs))
        peak = 0
        in_flight: list[int] = []   # output buffer bytes of the blocks not yet written, oldest first
        free: list[int] = []
        for k, (in_bytes, out_bytes, fixed, window) in enumerate(steps):
            if len(in_flight) >= OUT_BLOCKS_HELD:   # block k-3 is written: its buffer comes back
                size = in_flight.pop(0)
                if size and sum(1 for b in in_flight if b) + len(free) < OUT_BLOCKS_HELD:
                    free.append(size)
            size = 0
            if out_bytes:
                fitting = [b for b in free if b >= out_bytes]
                if fitting:
                    size = min(fitting)
                    free.remove(size)
                else:
                    free.clear()
                    size = out_bytes
            in_flight.append(size)
            ahead = sum(step[0] for step in steps[k + 1:k + window])
            peak = max(peak, in_bytes + ahead + sum(in_flight) + sum(free) + fixed)
        baseline = process_rss()
        return RssPrediction(baseline or BASELINE_BYTES, self.runtime_bytes(), peak, baseline is not None)

    def runtime_bytes(self) -> int:
        """What a run holds besides tensor data and the process it started in (RUNTIME_BYTES)."""
        if self.device.type == "cuda":   # the CUDA context and its libraries
            return RUNTIME_BYTES + CUDA_RUNTIME_BYTES
        if not any(get_op(job.op).compute for job in self.plan.jobs):   # copies: no tile worker runs
            return RUNTIME_BYTES
        return RUNTIME_BYTES + WORKER_BYTES * self.tile_workers

    def heap_guard(self) -> HeapGuard:
        """A guard for the host RSS this run promised: its RSS when the executor was made, plus
        the runtime, plus the budget (the tensor data never exceeds it; see ``predict_rss``)."""
        start = getattr(self, "_start_rss", None)
        return HeapGuard(None if start is None else start + self.runtime_bytes() + self.budget)

    def _replay(self, jobs: list[JobEstimate]):
        """(input bytes, output bytes, kernel and whole-input bytes) of every block, in run order."""
        for estimate in jobs:
            job, rows = estimate.job, estimate.block_rows
            if not job.output.numel:
                continue
            per_row, fixed, _ = self._memory_model(job)
            in_row, out_row = self._row_bytes(job)
            spec = get_op(job.op)
            passes = len(spec.passes_for(job.params)) if estimate.blocks > 1 or job.reduce_only else 0
            rowwise = spec.rowwise and job.output.shape
            tile = self.tile_rows(job)
            whole = self.whole_bytes(job) + self.whole_ahead_bytes(job)   # its whole inputs, and the next job's
            for pass_index in [*range(passes), *([] if job.reduce_only else [None])]:
                for start in range(0, job.output.rows, rows):
                    n = min(rows, job.output.rows - start)
                    if rowwise:
                        temps = fixed // (tile * self.tile_workers) * min(n, tile) * min(self.tile_workers, -(-n // tile))
                    else:   # the whole-tensor kernel: its fp32 temporaries are per row (in per_row)
                        temps = (per_row - IN_BLOCKS_HELD * in_row - OUT_BLOCKS_HELD * out_row) * n
                    # an op that does not compute passes its input blocks on as outputs: no buffers
                    # of their own, and the input slots bound them (engine/pipeline.py BlockSlots)
                    out_bytes = 0 if pass_index is not None or not spec.compute else out_row * n
                    yield in_row * n, out_bytes, temps + whole, IN_BLOCKS_HELD if spec.compute else COPY_BLOCKS_ALIVE
