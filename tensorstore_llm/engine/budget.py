"""The executor's memory model: rows per block from the budget, the smallest block a job needs,
and the estimate a dry run prints.

A mixin of ``Executor`` (it reads the plan, the device, the budget, the tile workers and the sink's
chunking); kept apart so that each module stays small.
"""
from __future__ import annotations

import math

from ..dtypes import by_name
from ..errors import InvalidParameter
from ..ops.registry import get_op
from ..units import format_size
from .plan import ROWS, WHOLE, TensorJob
from .records import Estimate, JobEstimate

IN_BLOCKS_HELD = 3    # being read, queued, being computed
OUT_BLOCKS_HELD = 3   # being produced, queued, being written


class MemoryPlanning:
    """How many rows a block of each job may have, and what the plan holds at its peak."""

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