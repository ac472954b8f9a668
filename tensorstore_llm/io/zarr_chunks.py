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
        """Write rows ``start:start+len(values)`` if they cover whole chunks; False = use zarr instead."""
        rows = values.shape[0] if self.shape else 1
        stop = start + rows
        if self.shape and (start % self.chunk_rows or (stop % self.chunk_rows and stop != self.shape[0])):
            return False
        data = memoryview(np.ascontiguousarray(values).reshape(-1).view(np.uint8))
        if not self.shape:
            self._write_chunk(0, data, 0)
            return True
        for index in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
            first = index * self.chunk_rows - start
            last = min(rows, first + self.chunk_rows)
            part = data[first * self.row_bytes:last * self.row_bytes]
            self._write_chunk(index, part, (self.chunk_rows - (last - first)) * self.row_bytes)
        return True

    def _write_chunk(self, index: int, data: memoryview, padding: int) -> None:
        path = self._path(index)
        parent = os.path.dirname(path)
        if parent not in self._made_dirs:
            os.makedirs(parent, exist_ok=True)
            self._made_dirs.add(parent)
        with open(path, "wb") as f:
            f.write(data)
            if padding:
                f.write(bytes(padding))  # edge chunks are stored at full chunk size
            f.flush()
            start_writeback(f.fileno())
        if self.on_written is not None:
            self.on_written(path)
