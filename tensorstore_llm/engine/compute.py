"""The compute stage of the executor: row tiles of a block on the tile workers, statistics
passes, the kernel call, and the casts into the compute dtype and device.

A mixin of ``Executor`` (it uses the executor's plan, device, seed, pools and output buffers);
kept apart so that each module stays small.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ..dtypes import by_name
from ..errors import OpError
from ..ops.registry import OpContext, get_op
from .plan import ROWS, WHOLE, TensorJob


class TileCompute:
    """Kernel calls on cache-sized row tiles, run ``tile_workers`` at a time, in tile order."""

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
                self._guard_heap()
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.tile_workers, thread_name_prefix="tsllm-tile")
        window: deque = deque()
        try:
            for tile in tiles:
                window.append(self._pool.submit(fn, *tile))
                if len(window) >= self.tile_workers:
                    yield window.popleft().result()
                    self._guard_heap()
            while window:
                yield window.popleft().result()
                self._guard_heap()
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
        stored = self._stored_inputs(spec, job, getattr(stats_pass, "stored_inputs", False))

        def one_tile(t0, t1, part):
            return stats_pass.map(self._context(job, t0, t1), job.params, **(part if stored else self._cast(spec, job, part)))

        for partial in self._map_tiles(one_tile, self._tiles(job, start, stop, tensors)):
            partial = _owned(partial)
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
            if spec.compute:   # a kernel on the whole block (tiled kernels are checked per tile); a copy makes no heap temporaries
                self._guard_heap()
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

    def _guard_heap(self) -> None:
        guard = getattr(self, "_heap", None)
        if guard is None:
            guard = self._heap = self.heap_guard()
        guard.after_block()

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

    def _stored_inputs(self, spec, job: TensorJob, asked: bool) -> bool:
        """Whether a statistics pass or a kernel that ``asked`` for its tiles as stored gets them
        (it then forms fp32 values itself, as ``_cast`` would: ``ops.topk.StoredInputsPass``, a
        kernel's ``stored_inputs_path``): where this run computes in fp32 on the CPU."""
        return (asked and spec.compute and self.device.type == "cpu" and self.compute_dtype == torch.float32
                and job.compute_dtype == "float32")

    def _cast(self, spec, job: TensorJob, tensors: dict) -> dict:
        if not spec.compute:
            return tensors
        dtype = self.compute_dtype if job.compute_dtype == "float32" else by_name(job.compute_dtype).torch

        def cast(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device=self.device, dtype=dtype)
        return {role: (_CastOnAccess(v, cast) if isinstance(v, list) else cast(v)) for role, v in tensors.items()}

    def _kernel(self, spec, job: TensorJob, start: int, stop: int, tensors: dict):
        ctx = self._context(job, start, stop)
        # a kernel may take the stored tiles itself where this run computes in fp32 on the CPU
        # (``stored_inputs_path``: None where it does not apply), saving the fp32 copy of each
        stored_path = getattr(spec.fn, "stored_inputs_path", None)
        if stored_path is not None and self._stored_inputs(spec, job, True):
            produced = stored_path(ctx, job.params, **tensors)
            if produced is not None:
                return produced
        return spec.fn(ctx, job.params, **self._cast(spec, job, tensors))


def _plain(value):
    """JSON form of the numbers and tensors a statistics record may hold."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"a reduction record holds {type(value).__name__}, which has no JSON form")


def _owned(value):
    """``value`` with its tensors copied by this thread.

    A partial that a tile worker made and the compute stage keeps until the reduce (per-row counts,
    a few kB) would sit in the worker's malloc arena between that worker's 2 MiB tile temporaries,
    so the arena could neither reuse nor trim the free space around it: measured ~100 MiB of free,
    resident heap at TIES's peak (its tie-count pass keeps one partial per tile)."""
    if isinstance(value, torch.Tensor):
        return value.clone() if value.device.type == "cpu" else value
    if isinstance(value, dict):
        return {k: _owned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_owned(v) for v in value)
    return value


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