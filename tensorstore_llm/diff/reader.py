"""Reading a delta-stored artifact: whole tensors, rebuilt block by block from the parent.

``Store.open`` hands out a :class:`DeltaTensorSource` for every artifact whose manifest has a
delta section, so export, merge, show, verify and the engine see ordinary tensors. Before any
read, the parent named in the manifest is checked against the binding: its artifact id and the
checksum of every tensor a delta was taken against. A parent that is missing or differs is an
IntegrityError (BaseMismatch-free: a delta never meets a base other than its own). Each rebuilt
block is compared with the per-block checksum recorded when the delta was stored, so a corrupted
parent chunk, a damaged coded block or a codec fault fails the read that meets it.

Reads that fall in one block (a whole small tensor, or rows of a big one) also start rebuilding
the block that follows (the next block of the tensor, or the first block of the next tensor) on a
worker thread, so a reader going through the model in order keeps two cores busy: its own thread
rebuilds one block while a worker rebuilds the next (the parent's read included).

Memory: beyond the rows the caller asked for, a read holds per block in flight what rebuilding
that block holds at its peak (the parent's rows, the coded bytes, the decoder's buffers and the
rebuilt rows; :mod:`.read_memory` reads it from each block's header), for up to ``workers + 1``
blocks in flight and the block read ahead (``extra_read_bytes``); a chain holds that once per
link. Rows returned from part of a block are copies, so the caller's rows never keep a whole
rebuilt block alive. ``fit_read_memory(share)`` (the engine calls it with each source's share of
``--max-memory``) picks the most overlap whose buffers take at most half the share: two decoding
workers and the read-ahead, one worker and the read-ahead, or none (each block rebuilt on the
reading thread, one at a time), so a delta input works under any budget that holds one block's
rebuild, with less overlap when the budget is small.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ..dtypes import by_name, raw_bytes
from ..errors import ArtifactNotFound, CodecError, FormatError, IntegrityError, TensorNotFound
from ..io.base import SourceBase, TensorMeta
from ..io.zarr_chunks import chunk_file
from .read_memory import block_holding
from .store import DeltaSection, block_path, decode_block

DECODE_WORKERS = 2
# (decoding workers, read-ahead) from the most overlap to none: fit_read_memory takes the first
# whose buffers fit half of the share of the budget it is given
OVERLAP_LEVELS = ((DECODE_WORKERS, True), (1, True), (0, False))


def open_delta(store, artifact) -> DeltaTensorSource:
    """A TensorSource over delta-stored ``artifact``; IntegrityError when its parent is missing or
    is not the exact parent it was stored against."""
    where = f"artifact {artifact.short_id} ({artifact.path})"
    section = DeltaSection.from_info(artifact.manifest.info, where)
    try:
        parent = store.get(section.base_id)
    except ArtifactNotFound:
        raise IntegrityError(f"{where}: stored as a delta of artifact {section.base_id[:12]}, which this store "
                             f"no longer holds; its tensors cannot be rebuilt") from None
    check_binding(section, parent, where)
    return DeltaTensorSource(artifact, section, store.open(parent.id))


def check_binding(section: DeltaSection, parent, where: str) -> None:
    """IntegrityError unless ``parent`` has every tensor the deltas were taken against, with the
    recorded checksum."""
    tensors = parent.manifest.tensors
    for name, checksum in section.base_checksums.items():
        record = tensors.get(name)
        if record is None or record.checksum != checksum:
            found = record.checksum[:23] + "..." if record else "no such tensor"
            raise IntegrityError(f"{where}: parent {parent.short_id} tensor {name!r} is not the one the delta was "
                                 f"stored against (recorded {checksum[:23]}..., parent has {found})")


class DeltaTensorSource(SourceBase):
    """Tensors of a delta-stored artifact: each block rebuilt from the parent's rows and verified.

    Reads that span several blocks rebuild them on ``workers`` threads (the codecs release the
    GIL; ``DECODE_WORKERS`` unless :meth:`fit_read_memory` chose fewer). A read within one block
    starts rebuilding the next block on a worker (``read_ahead``). The last rebuilt block is kept, so row-by-row reads decode each block once. ``prefetch``
    (off by default) hints the kernel to read ahead the files of the blocks to come: on this
    project's disk (0.3-1 GB/s) it did not measurably speed up cold reads (docs/benchmarks.md,
    "Reconstruct and read cost against the raw ceiling"), so it is a switch for slower disks.
    """

    prefetch = False

    def __init__(self, artifact, section: DeltaSection, parent_source):
        self.artifact = artifact
        self.path = artifact.path
        self.identity = "artifact:" + artifact.id
        self.label = f"artifact {artifact.short_id} ({artifact.path})"
        self.section = section
        self.parent = parent_source
        self._metas = artifact.manifest.metas()
        self._chunks = artifact.manifest.chunk_digests()
        self._pool: ThreadPoolExecutor | None = None
        self._cache: tuple | None = None
        self._ahead: tuple | None = None                 # ((name, index), future) of the block read ahead
        self._order = {name: i for i, name in enumerate(self._metas)}
        self._lock = threading.Lock()
        self.workers, self.read_ahead = OVERLAP_LEVELS[0]
        self._holding: dict[str, int] | None = None      # tensor -> bytes its largest block's rebuild holds

    def keys(self) -> list[str]:
        return list(self._metas)

    def meta(self, name: str) -> TensorMeta:
        if name not in self._metas:
            raise TensorNotFound(f"{self.label}: has no tensor {name!r}")
        return self._metas[name]

    def preferred_rows(self, name: str) -> int:
        """Rows per stored block: aligned reads rebuild no block twice."""
        return self._entry(name).rows

    def extra_read_bytes(self, name: str) -> int:
        """Memory a read of ``name`` holds beyond the rows it returns: what rebuilding its largest
        block holds (:mod:`.read_memory`) for each block in flight (``workers + 1``, or 1 when
        blocks are rebuilt on the reading thread), what the artifact's largest block holds if the
        next block is read ahead, and the same again for the parent's chain. For a memory model
        to add to its budget."""
        self.meta(name)
        holding = self._holdings()
        in_flight = self.workers + 1 if self.workers else 1
        own = in_flight * holding.get(name, 0) + (max(holding.values(), default=0) if self.read_ahead else 0)
        parent_extra = getattr(self.parent, "extra_read_bytes", None)
        return own + (parent_extra(name) if parent_extra and self._entry(name).mode == "delta" else 0)

    def fit_read_memory(self, share: int) -> None:
        """Take the most overlap (decoding workers, read-ahead; ``OVERLAP_LEVELS``) whose buffers,
        this link's and its parents', take at most half of ``share`` bytes for every tensor; with
        none that small, rebuild one block at a time on the reading thread. The same level is set
        along the chain. Called by the engine with this source's share of the budget."""
        for workers, ahead in OVERLAP_LEVELS:
            self._set_overlap(workers, ahead)
            if max((self.extra_read_bytes(n) for n in self._metas), default=0) <= share // 2:
                return

    def _set_overlap(self, workers: int, ahead: bool) -> None:
        self.workers, self.read_ahead = workers, ahead
        if isinstance(self.parent, DeltaTensorSource):
            self.parent._set_overlap(workers, ahead)

    def _holdings(self) -> dict[str, int]:
        """Per tensor, what rebuilding its largest stored block holds (headers read once)."""
        if self._holding is None:
            codec = self.section.codec.get("name", "")
            holding = {}
            for name, meta in self._metas.items():
                entry = self.section.tensors.get(name)
                if entry is None or not meta.numel:
                    continue
                row_bytes = meta.row_numel * by_name(meta.dtype).itemsize
                holding[name] = max((block_holding(block_path(self.path, name, i), entry.mode, codec,
                                                   (min(meta.rows, (i + 1) * entry.rows) - i * entry.rows) * row_bytes
                                                   if meta.shape else meta.nbytes, size)
                                     for i, (_, size) in enumerate(entry.blocks)), default=0)
            self._holding = holding
        return self._holding

    def _entry(self, name: str):
        entry = self.section.tensors.get(name)
        if entry is None:
            raise FormatError(f"{self.label}: tensor {name!r} is in the manifest but not in its delta section")
        return entry

    def read_rows(self, name: str, start: int, stop: int):
        """Rows ``start:stop`` of ``name`` (the whole value for a scalar), rebuilding only the
        blocks they lie in, each checked against its recorded checksum."""
        meta = self.meta(name)
        if meta.shape and not 0 <= start <= stop <= meta.shape[0]:
            raise IndexError(f"{self.label}: rows {start}:{stop} outside tensor {name!r} of shape {meta.shape}")
        if not meta.shape:
            return self._block(meta, 0).reshape(())
        if start == stop or not meta.numel:
            return torch.empty((stop - start, *meta.shape[1:]), dtype=_torch_dtype(meta))
        rows = self._entry(name).rows
        first, last = start // rows, -(-stop // rows)
        if last - first == 1:
            block = self._block(meta, first)
            part = block[start - first * rows:stop - first * rows]
            return part if part.shape[0] == block.shape[0] else part.clone()   # never pins a whole block
        return self._blocks(meta, start, stop, rows)

    def _blocks(self, meta: TensorMeta, start: int, stop: int, rows: int):
        """Rows of several blocks: parent rows read here in order, blocks rebuilt on the worker
        threads and copied into the output as they finish (at most ``workers + 1`` blocks are
        alive beside it); with no workers, each block rebuilt here in turn."""
        out = torch.empty((stop - start, *meta.shape[1:]), dtype=_torch_dtype(meta))
        pending = []

        def place(index, values):
            a = max(start, index * rows)
            b = min(stop, (index + 1) * rows)
            out[a - start:b - start] = values[a - index * rows:b - index * rows]

        self._prefetch(meta, start // rows, -(-stop // rows) - 1)
        for index in range(start // rows, -(-stop // rows)):
            data, base = self._inputs(meta, index)
            if not self.workers:
                place(index, self._rebuild(meta, index, data, base))
                continue
            pending.append((index, self._workers().submit(self._rebuild, meta, index, data, base)))
            del data, base
            if len(pending) > self.workers:
                index, future = pending.pop(0)
                place(index, future.result())
        for index, future in pending:
            place(index, future.result())
        return out

    def _block(self, meta: TensorMeta, index: int):
        """Block ``index`` of ``meta``'s tensor, rebuilt here (or taken from the read-ahead), while
        a worker starts on the block after it (when reading ahead)."""
        key = (meta.name, index)
        with self._lock:
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
            ahead, self._ahead = self._ahead, None
            self._cache = None                           # the last block is not held beside the next
        if ahead is not None and ahead[0] != key:
            if not ahead[1].cancel():                    # a stale guess: let it finish before the
                ahead[1].exception()                     # next rebuild, so no more blocks are alive
            ahead = None                                 # than the memory model counts
        if self.read_ahead:
            self._read_ahead(meta, index)
        values = ahead[1].result() if ahead is not None else self._rebuild(meta, index, *self._inputs(meta, index))
        with self._lock:
            self._cache = (key, values)
        return values

    def _workers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=DECODE_WORKERS, thread_name_prefix="tsllm-undelta")
        return self._pool

    def _next_block(self, meta: TensorMeta, index: int):
        """(meta, index) of the block after ``index`` (or the next tensor's first); None at the end."""
        blocks = -(-meta.rows // self._entry(meta.name).rows) if meta.shape else 1
        if index + 1 < blocks:
            return meta, index + 1
        names = list(self._metas)
        at = self._order[meta.name] + 1
        while at < len(names) and not self._metas[names[at]].numel:
            at += 1
        return (self._metas[names[at]], 0) if at < len(names) else None

    def _read_ahead(self, meta: TensorMeta, index: int) -> None:
        """Start rebuilding the block after ``index`` on a worker, and ask the kernel to start
        reading the files of the block after that one (see :meth:`_prefetch`)."""
        nxt = self._next_block(meta, index)
        if nxt is None:
            return
        future = self._workers().submit(lambda m, i: self._rebuild(m, i, *self._inputs(m, i)), *nxt)
        with self._lock:
            self._ahead = ((nxt[0].name, nxt[1]), future)
        after = self._next_block(*nxt)
        if after is not None:
            self._prefetch(*after)

    def _prefetch(self, meta: TensorMeta, first: int, last: int | None = None) -> None:
        """POSIX_FADV_WILLNEED on the files blocks ``first..last`` will read: their coded blocks
        and, for a parent stored whole, the parent's chunk files under the same rows. The kernel
        reads them in the background while this block decodes, so a cold read waits less on the
        disk. A hint only: nothing is read here, and where the call is missing nothing happens."""
        if not self.prefetch or not hasattr(os, "posix_fadvise"):
            return
        entry = self._entry(meta.name)
        last = first if last is None else last
        paths = [block_path(self.path, meta.name, i) for i in range(first, min(last + 1, len(entry.blocks)))]
        parent_dir = getattr(self.parent, "path", None)
        chunk_rows = getattr(self.parent, "preferred_rows", lambda n: 0)(meta.name)
        if entry.mode == "delta" and parent_dir and not isinstance(self.parent, DeltaTensorSource) and chunk_rows:
            a, b = self._bounds(meta, first)[0], self._bounds(meta, last)[1]
            ndim = len(meta.shape)
            array_dir = os.path.join(parent_dir, "tensors", meta.name)
            paths += [chunk_file(array_dir, ndim, c) for c in range(a // chunk_rows, -(-b // chunk_rows) if ndim else 1)]
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue                                   # a missing file fails the read itself, with its name
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def _bounds(self, meta: TensorMeta, index: int) -> tuple[int, int]:
        rows = self._entry(meta.name).rows
        return index * rows, min(meta.rows, (index + 1) * rows)

    def _inputs(self, meta: TensorMeta, index: int):
        """(coded bytes, parent rows or None) of block ``index``."""
        entry = self._entry(meta.name)
        if index >= len(entry.blocks):
            raise IntegrityError(f"{self.label}: tensor {meta.name!r} has {len(entry.blocks)} stored blocks, "
                                 f"block {index} was asked for")
        path = block_path(self.path, meta.name, index)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise IntegrityError(f"{self.label}: block {index} of tensor {meta.name!r} ({path}) is missing") from None
        if len(data) != entry.blocks[index][1]:
            raise IntegrityError(f"{self.label}: block {index} of tensor {meta.name!r} ({path}) has {len(data)} "
                                 f"bytes, recorded {entry.blocks[index][1]}")
        base = None
        if entry.mode == "delta":
            a, b = self._bounds(meta, index)
            base = self.parent.read_rows(meta.name, a, b) if meta.shape else self.parent.read(meta.name)
        return data, base

    def _rebuild(self, meta: TensorMeta, index: int, data: bytes, base):
        a, b = self._bounds(meta, index)
        entry = self._entry(meta.name)
        try:
            values = decode_block(self.section.codec, entry, meta, a, b, data, base)
        except (CodecError, ValueError, RuntimeError) as e:
            raise IntegrityError(f"{self.label}: block {index} of tensor {meta.name!r} cannot be decoded "
                                 f"({e.__class__.__name__}: {e})") from None
        digests = self._chunks.get(meta.name)
        if digests is None or digests.rows != entry.rows:
            raise FormatError(f"{self.label}: tensor {meta.name!r} has no block checksums matching its delta blocks")
        digests.check(meta, index, raw_bytes(values), self.label + " (rebuilt from its parent)")
        return values

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._cache = None
        self.parent.close()


def _torch_dtype(meta: TensorMeta):
    return by_name(meta.dtype).torch


def stored_payload_bytes(artifact) -> int:
    """Bytes of the coded blocks a delta-stored artifact holds (its own, not its parent's)."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in
               os.walk(os.path.join(artifact.path, "deltas")) for f in files)
