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
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..dtypes import by_name
from ..errors import InvalidParameter
from ..io.base import TensorSink
from ..io.gather import gather_rows
from ..ops.registry import get_op
from ..seeding import RNG_GROUP_ELEMENTS
from ..units import parse_size
from .budget import IN_BLOCKS_HELD, OUT_BLOCKS_HELD, MemoryPlanning  # noqa: F401  (OUT_BLOCKS_HELD kept importable here)
from .compute import TileCompute, _CastOnAccess, _plain, _whole_roles  # noqa: F401  (names kept importable here)
from .devices import Uploader, default_tile_workers, resolve_device
from .memory import BlockBuffers, release_free_heap, tune_allocator
from .options import RunOptions, auto_budget, is_auto
from .pipeline import DONE, Pipeline
from .plan import GATHER, WHOLE, Plan, TensorJob
from .progress import Progress
from .records import Block, Estimate, JobEstimate, Result  # noqa: F401

TILE_ELEMENTS_CPU = RNG_GROUP_ELEMENTS  # 2^19: fp32 temps of 2 MiB (cache-sized, below the mmap threshold)
TILE_ELEMENTS_CUDA = 1 << 26


class Executor(MemoryPlanning, TileCompute):
    """Runs ``plan`` into ``sink``.

    Args:
        options: how to run (:class:`RunOptions`): its device (``auto``, ``cpu``, ``cuda`` or
            ``cuda:N``; decided once, here), max_memory (budget for tensor data held by the engine,
            e.g. ``"512M"``; interpreter and libraries come on top), seed (for ops that draw
            random numbers) and progress are used; compression and dry_run belong to the caller.
        run_options: the same fields as keywords (``max_memory="1G"``), overriding ``options``.
        desc: label of the progress bar.
        compute_dtype: dtype kernels compute in (fp32 by default).
        tile_workers: threads computing row tiles at once (CPU; default: the usable cores, <= 8).
        records_path: JSON-lines journal of finished reduction jobs (a re-run skips them).
    Example:
        >>> Executor(plan, sink, RunOptions(max_memory="1G")).run()     # doctest: +SKIP
    """

    def __init__(self, plan: Plan, sink: TensorSink | None = None, options: RunOptions | None = None, *,
                 desc: str = "tsllm", compute_dtype: str = "float32", tile_workers: int | None = None,
                 records_path: str | None = None, **run_options):
        self.options = opts = RunOptions.of(options, **run_options)
        self.plan = plan
        self.sink = sink
        self.device = resolve_device(opts.device)
        self.budget = None if is_auto(opts.max_memory) else parse_size(opts.max_memory)   # None: sized below
        self.seed = int(opts.seed)
        self.compute_dtype = by_name(compute_dtype).torch
        self.progress_enabled = opts.progress
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
        if self.budget is None:   # max_memory='auto' (the default): from the plan (default_budget.py)
            self.budget = auto_budget(plan, self.min_block_bytes)
        # sources that size what they hold beyond the rows they return by the budget (a delta-stored
        # input's decode buffers and blocks in flight, diff/reader.py): each gets an equal share
        fitting = [s for s in {id(s): s for s in plan.sources.values()}.values() if hasattr(s, "fit_read_memory")]
        for source in fitting:
            source.fit_read_memory(self.budget // len(fitting))
        self.check_budget()

    # -- planning -------------------------------------------------------------------------------
    def tile_rows(self, job: TensorJob) -> int:
        """Rows per kernel call: about TILE_ELEMENTS outputs, so fp32 temporaries stay in cache."""
        tile = TILE_ELEMENTS_CUDA if self.device.type == "cuda" else TILE_ELEMENTS_CPU
        return max(1, tile // max(1, job.output.row_numel))

    # -- running --------------------------------------------------------------------------------
    def run(self) -> dict[str, str]:
        """Compute every job not already finished in the sink. Returns output name -> checksum."""
        if self.sink is None and any(j.outputs() for j in self.plan.jobs):
            raise InvalidParameter("Executor.run: the plan has outputs to write but no sink was given")
        tune_allocator()
        intra_op_threads = torch.get_num_threads()
        if self.tile_workers > 1:
            torch.set_num_threads(1)   # the tile workers are the parallelism (torch's setting is process-wide)
        try:
            return self._run()
        finally:
            torch.set_num_threads(intra_op_threads)
            # the kernels' freed temporaries stay in glibc's arenas (the heap guard trims only
            # near the budget): give them back, so that what the caller does next (a LoRA verb
            # reads its factors back, commits and exports) starts from the baseline
            release_free_heap()

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
        pipeline = Pipeline(IN_BLOCKS_HELD, self.whole_jobs_held)
        reader = threading.Thread(target=pipeline.guard, args=(self._read_all, todo, pipeline), daemon=True)
        writer = threading.Thread(target=pipeline.guard, args=(self._write_all, results, pipeline, progress), daemon=True)
        reader.start()
        writer.start()
        try:
            while True:
                # The finished block is dropped before this wait, not when the next one arrives:
                # otherwise, once the queue frees, the reader starts a fourth block while this
                # thread (still waiting for the GIL, which the reader holds while it maps and
                # populates its block) holds the third. Measured: +240 MiB at 1G on 70B shapes.
                block = pipeline.get(pipeline.inputs)
                if block is DONE:
                    break
                job = block.job
                if block.pass_index is not None:
                    self._stats_block(job, block.pass_index, block.start, block.stop, block.tensors, block.last)
                    if job.reduce_only:
                        self._finish_reduction(block, progress)
                    block = None   # let go of the inputs before waiting for the next block (see below)
                    continue
                values = self._compute(job, block.start, block.stop, block.tensors) if block.tensors is not None else None
                result, block = Result(job, block.start, values, block.last), None
                pipeline.put(pipeline.outputs, result)
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
            whole_taken = None
            if any(r.relation == WHOLE for r in job.refs()):
                # at most ``whole_jobs_held`` jobs' whole inputs alive (engine/budget.py)
                whole_taken = pipeline.whole_slots.acquire(pipeline.stop)
                if whole_taken is None:
                    return

            def read(ref, start, stop):
                if ref.relation == WHOLE:
                    if ref not in held:
                        # a tensor object of our own (same storage): its end frees the job's whole
                        # slot even when the source keeps the one it returned (an in-memory scalar)
                        held[ref] = self._read(ref, 0, self.plan.input_meta(ref).rows, upload).detach()
                    return held[ref]
                return self._read(ref, start, stop, upload)
            for pass_index in [*range(passes), *([] if job.reduce_only else [None])]:
                for start in range(0, meta.rows, rows):
                    stop = min(meta.rows, start + rows)
                    taken = pipeline.slots.acquire(pipeline.stop)
                    if taken is None:
                        return
                    tensors = {}
                    for role, refs in job.inputs:
                        if isinstance(refs, tuple):
                            tensors[role] = [read(r, start, stop) for r in refs]
                        else:
                            tensors[role] = read(refs, start, stop)
                    pipeline.slots.release_when_gone([t for _ref, t in _row_inputs(job, tensors)], taken)
                    if not pipeline.put(pipeline.inputs, Block(job, pass_index, start, stop, tensors, stop == meta.rows)):
                        return
            if whole_taken is not None:
                pipeline.whole_slots.release_when_gone(list(held.values()), whole_taken)
            tensors = held = None   # the compute stage holds this job's inputs now, not the reader
        pipeline.put(pipeline.inputs, DONE)

    def _read(self, ref, start, stop, upload: bool = False):
        if ref.relation == GATHER:
            block = gather_rows(self.plan.sources[ref.source], ref.name, np.asarray(ref.index[start:stop]))
        else:
            block = self.plan.sources[ref.source].read_rows(ref.name, start, stop)
        return self._uploader.upload(block) if upload else block

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



def _row_inputs(job: TensorJob, tensors: dict):
    """(ref, tensor) of the ROWS inputs of one block (WHOLE inputs are held for the whole job)."""
    for role, refs in job.inputs:
        if isinstance(refs, tuple):
            yield from ((r, t) for r, t in zip(refs, tensors[role]) if r.relation != WHOLE)
        elif refs.relation != WHOLE:
            yield refs, tensors[role]
