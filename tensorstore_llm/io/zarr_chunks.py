"""Direct row-range I/O on the chunk files of an uncompressed, row-chunked Zarr v3 array.

For arrays whose only codec is ``bytes`` (little endian) and whose chunks hold whole rows, a chunk
file is just the rows' bytes (edge chunks padded to full size), so a block of rows can be read
with ``pread`` straight into the destination buffer and written with one ``write`` per chunk.
This skips two buffer copies and a thread-pool hop per chunk in zarr-python (measured: the store
reads at the speed of the raw files, see docs/benchmarks.md). The files are exactly what zarr
writes, so zarr and other Zarr v3 readers read them, and anything else falls back to zarr.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..errors import FormatError, IntegrityError
from .fsutil import start_writeback
from .safetensors_format import pread_into


def chunk_file(array_dir: str, ndim: int, index: int) -> str:
    """The file of row chunk ``index`` of an array chunked by whole rows (default key encoding)."""
    if not ndim:
        return os.path.join(array_dir, "c")
    return os.path.join(array_dir, "c", str(index), *(["0"] * (ndim - 1)))


class RawRowChunks:
    """Chunk files of one array: rows ``[i*R, (i+1)*R)`` live in ``c/i/0/.../0``."""

    def __init__(self, array_dir: str, shape: tuple[int, ...], chunk_rows: int, itemsize: int):
        self.array_dir = array_dir
        self.shape = shape
        self.chunk_rows = chunk_rows
        self.row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64)) if shape else itemsize
        self._made_dirs: set[str] = set()
        self.on_written = None   # called with each chunk file's path once it is written
        self.next_row = 0        # where the next block of an in-order write starts

    @classmethod
    def open(cls, array_dir: str, itemsize: int) -> RawRowChunks | None:
        """The raw view of the array at ``array_dir``, or None when its layout needs zarr's codecs."""
        try:
            with open(os.path.join(array_dir, "zarr.json"), "rb") as f:
                meta = json.loads(f.read())
            shape = tuple(meta["shape"])
            chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
            codecs = meta["codecs"]
            key = meta["chunk_key_encoding"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        plain = (len(codecs) == 1 and codecs[0].get("name") == "bytes"
                 and (codecs[0].get("configuration") or {}).get("endian", "little") in ("little", None))
        default_key = key.get("name") == "default" and (key.get("configuration") or {}).get("separator", "/") == "/"
        whole_rows = chunks[1:] == shape[1:] and (not shape or chunks[0] >= 1)
        if not (plain and default_key and whole_rows and not meta.get("storage_transformers")):
            return None
        return cls(array_dir, shape, chunks[0] if shape else 1, itemsize)

    def _path(self, index: int) -> str:
        return chunk_file(self.array_dir, len(self.shape), index)

    def read_rows(self, start: int, stop: int, out: np.ndarray) -> None:
        """Fill ``out`` (C-contiguous, rows ``start:stop``) from the chunk files.

        A missing or truncated chunk file raises IntegrityError: a committed tensor has every
        chunk, so reading one as fill value (zarr's rule) would pass off lost data as zeros.
        """
        flat = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
        if not self.shape:
            self._read_chunk_part(0, 0, flat)
            return
        position = start
        while position < stop:
            index = position // self.chunk_rows
            chunk_stop = min(stop, (index + 1) * self.chunk_rows)
            dest = flat[(position - start) * self.row_bytes:(chunk_stop - start) * self.row_bytes]
            self._read_chunk_part(index, (position - index * self.chunk_rows) * self.row_bytes, dest)
            position = chunk_stop

    def _read_chunk_part(self, index: int, offset: int, dest: memoryview) -> None:
        path = self._path(index)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise IntegrityError(f"{path}: chunk {index} of this tensor is missing") from None
        try:
            pread_into(path, fd, dest, offset)
        except FormatError as e:
            raise IntegrityError(f"chunk {index}: {e}") from None
        finally:
            os.close(fd)

    def write_rows(self, start: int, values: np.ndarray) -> bool:
        """Write rows ``start:start+len(values)``; False (nothing written) = use zarr instead.

        Blocks of a tensor come in order, so a block smaller than a chunk is written into its
        chunk file at its offset, and the file is completed (padded, handed to ``on_written``)
        with the chunk's last row: the files are the same bytes as whole-chunk writes give, and
        no chunk is read back and merged (zarr's way, which held several chunk-sized buffers).
        Raises ValueError for a block that does not start where the previous one ended.
        """
        rows = values.shape[0] if self.shape else 1
        stop = start + rows
        data = memoryview(np.ascontiguousarray(values).reshape(-1).view(np.uint8))
        if not self.shape:
            self._write_chunk(0, data, 0, 0)
            return True
        if start != self.next_row and start % self.chunk_rows:
            raise ValueError(f"{self.array_dir}: got rows from {start}, expected {self.next_row} (blocks come in order)")
        self.next_row = stop
        position = start
        while position < stop:
            index = position // self.chunk_rows
            chunk_start = index * self.chunk_rows
            chunk_stop = min(stop, chunk_start + self.chunk_rows)
            part = data[(position - start) * self.row_bytes:(chunk_stop - start) * self.row_bytes]
            complete = chunk_stop == min(self.shape[0], chunk_start + self.chunk_rows)
            padding = (self.chunk_rows - (chunk_stop - chunk_start)) * self.row_bytes if complete else 0
            self._write_chunk(index, part, (position - chunk_start) * self.row_bytes, padding, complete)
            position = chunk_stop
        return True

    def _write_chunk(self, index: int, data: memoryview, offset: int, padding: int, complete: bool = True) -> None:
        """Write ``data`` at ``offset`` of chunk file ``index`` (a new file when 0); once the
        chunk is ``complete``, pad it to full size and start its writeback."""
        path = self._path(index)
        parent = os.path.dirname(path)
        if parent not in self._made_dirs:
            os.makedirs(parent, exist_ok=True)
            self._made_dirs.add(parent)
        with open(path, "r+b" if offset else "wb") as f:
            if offset:
                f.seek(offset)
            f.write(data)
            if padding:
                f.write(bytes(padding))  # edge chunks are stored at full chunk size
            f.flush()
            if complete:
                start_writeback(f.fileno())
        if complete and self.on_written is not None:
            self.on_written(path)
