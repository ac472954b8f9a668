"""The two contracts every format implements: TensorSource (read) and TensorSink (write).

Modelled on ``safetensors.safe_open``: few nouns, the same verbs everywhere. Sources hand out CPU
tensors in their stored dtype; sinks take row blocks in order and return a checksum per tensor.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import xxhash

from ..errors import IntegrityError, InvalidTensorName

CHECKSUM_ALGO = "sha256"
CHUNK_ALGO = "xxh3_64"   # ~30 GB/s: cheap enough to check every chunk on every read


@dataclass(frozen=True)
class TensorMeta:
    """Name, shape and logical dtype name of one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Length of the first axis (1 for a scalar): the axis row blocks split."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def nbytes(self) -> int:
        from ..dtypes import by_name

        return self.numel * by_name(self.dtype).itemsize


@runtime_checkable
class TensorSource(Protocol):
    """Read access to a set of named tensors; a context manager that closes its files.

    Example:
        >>> with store.open("base") as src:                     # doctest: +SKIP
        ...     meta = src.meta("model.embed_tokens.weight")     # TensorMeta(name, shape, dtype)
        ...     rows = src.read_rows(meta.name, 0, 1024)         # reads only those rows
    """

    identity: str  # a string that changes whenever the content may have changed

    def keys(self) -> list[str]:
        """Names of every tensor, in the source's order."""
        ...

    def meta(self, name: str) -> TensorMeta:
        """Shape and dtype of tensor ``name`` without reading it; TensorNotFound if absent."""
        ...

    def read(self, name: str):
        """The whole tensor ``name`` as a CPU tensor of its stored dtype (checked, where the
        format has checksums)."""
        ...

    def read_rows(self, name: str, start: int, stop: int):
        """Rows ``start:stop`` of tensor ``name`` (first axis), reading as little else as the
        format allows; the whole value for a scalar."""
        ...

    def close(self) -> None:
        """Release open files; the source is not used afterwards."""
        ...


@runtime_checkable
class TensorSink(Protocol):
    """Write access: ``prepare`` once, then each tensor's row blocks in order, then ``commit``.

    Example:
        >>> sink = store.create("job-1")                         # doctest: +SKIP
        >>> sink.prepare([TensorMeta("w", (4, 4), "float32")])
        >>> if "w" not in sink.completed():                      # resuming skips finished tensors
        ...     sink.write_rows("w", 0, torch.zeros(4, 4)); sink.finish("w")
        >>> artifact = sink.commit(kind="checkpoint")
    """

    def prepare(self, metas: Iterable[TensorMeta]) -> None:
        """Declare every tensor that will be written, before the first block."""
        ...

    def preferred_rows(self, meta: TensorMeta) -> int:
        """Row granularity that writes whole storage chunks: blocks should be multiples of it."""
        ...

    def completed(self) -> dict[str, str]:
        """Tensors already finished (by an interrupted earlier run too), name -> checksum; each
        was read back and re-checked."""
        ...

    def write_rows(self, name: str, start: int, block) -> None:
        """Write rows ``start:start+len(block)`` of ``name``; blocks of a tensor come in order."""
        ...

    def finish(self, name: str) -> str:
        """Close tensor ``name`` after its last block; returns its checksum (journaled for resume)."""
        ...

    def close(self) -> None:
        """Stop writing but keep what is staged, so the same job can resume."""
        ...

    def abort(self) -> None:
        """Discard everything staged; the destination is left as it was."""
        ...


class Closing:
    """A context manager that calls ``close()`` on exit (sources of tensors and of datasets)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SourceBase(Closing):
    """Shared behaviour of sources: context management and whole-tensor reads via rows."""

    identity = ""

    def read(self, name: str):
        """The whole tensor ``name`` as a CPU tensor of its stored dtype."""
        meta = self.meta(name)
        block = self.read_rows(name, 0, meta.rows)
        return block.reshape(meta.shape)

    def metas(self) -> list[TensorMeta]:
        return [self.meta(k) for k in self.keys()]


@dataclass(frozen=True)
class ChunkDigests:
    """A fast checksum of every storage chunk of a tensor: chunk ``i`` holds rows
    ``[i*rows, (i+1)*rows)`` (the last one fewer), hashed over their logical bytes with ``algo``.

    Recorded at write time next to the tensor's sha256, and checked on every read, so a flipped
    byte or a lost chunk file is caught by the reader that meets it, not only by ``verify``.
    """

    rows: int
    digests: tuple[str, ...]
    algo: str = CHUNK_ALGO

    def chunk_count(self, meta: TensorMeta) -> int:
        return -(-meta.rows // self.rows) if meta.numel else 0

    def check(self, meta: TensorMeta, index: int, data, where: str) -> None:
        """Raise IntegrityError unless ``data`` (chunk ``index``'s logical bytes) hashes as recorded."""
        actual = chunk_digest(data)
        if actual != self.digests[index]:
            first = index * self.rows
            raise IntegrityError(
                f"{where}: tensor {meta.name!r} chunk {index} (rows {first}:{min(meta.rows, first + self.rows)}) "
                f"is corrupted: checksum mismatch ({self.algo} {actual}, recorded {self.digests[index]})")

    def to_json(self) -> dict:
        return {"rows": self.rows, "algo": self.algo, "digests": list(self.digests)}

    @classmethod
    def from_json(cls, body: dict) -> ChunkDigests:
        algo = str(body.get("algo", CHUNK_ALGO))
        if algo != CHUNK_ALGO:
            raise ValueError(f"unknown chunk checksum {algo!r}")
        return cls(int(body["rows"]), tuple(str(d) for d in body["digests"]), algo)


def chunk_digest(data) -> str:
    """The chunk checksum of a bytes-like object."""
    return xxhash.xxh3_64_hexdigest(data)


class RowHasher:
    """Checksums a tensor from row blocks that must arrive in order; catches gaps and overlaps.

    With ``chunk_rows`` it also hashes every run of ``chunk_rows`` rows on its own
    (:class:`ChunkDigests`), whatever the block boundaries.
    """

    def __init__(self, meta: TensorMeta, where: str, chunk_rows: int | None = None):
        self.meta, self.where = meta, where
        self.next_row = 0
        self._hash = hashlib.new(CHECKSUM_ALGO)
        self.chunk_rows = chunk_rows
        self._chunk = xxhash.xxh3_64()
        self._chunk_digests: list[str] = []

    def update(self, start: int, raw: memoryview, rows: int) -> None:
        if start != self.next_row:
            raise ValueError(f"{self.where}: tensor {self.meta.name!r} got rows from {start}, expected {self.next_row}")
        self._hash.update(raw)
        if self.chunk_rows:
            self._update_chunks(start, memoryview(raw).cast("B"), rows)
        self.next_row += rows

    def _update_chunks(self, start: int, raw: memoryview, rows: int) -> None:
        row_bytes = len(raw) // rows if rows else 0
        position = start
        while position < start + rows:
            chunk_end = min(start + rows, (position // self.chunk_rows + 1) * self.chunk_rows)
            self._chunk.update(raw[(position - start) * row_bytes:(chunk_end - start) * row_bytes])
            if chunk_end % self.chunk_rows == 0 or chunk_end == self.meta.rows:
                self._chunk_digests.append(self._chunk.hexdigest())
                self._chunk.reset()
            position = chunk_end

    def hexdigest(self) -> str:
        if self.next_row != self.meta.rows and self.meta.numel:
            raise ValueError(f"{self.where}: tensor {self.meta.name!r} finished after {self.next_row} of {self.meta.rows} rows")
        return f"{CHECKSUM_ALGO}:{self._hash.hexdigest()}"

    def chunk_digests(self) -> ChunkDigests | None:
        """The per-chunk digests of the finished tensor (None without ``chunk_rows``)."""
        if not self.chunk_rows:
            return None
        self.hexdigest()   # the same completeness check
        return ChunkDigests(self.chunk_rows, tuple(self._chunk_digests))


def digest_rows(meta: TensorMeta, read_rows, where: str, chunk_rows: int | None = None,
                block_bytes: int = 64 * 1024 * 1024, chunk_digests: bool = True) -> tuple[str, ChunkDigests | None]:
    """(sha256 checksum, chunk digests) of a stored tensor, read back ``block_bytes`` at a time
    with ``read_rows(start, stop)`` (blocks aligned to ``chunk_rows`` when given). Without
    ``chunk_digests`` the blocks are still aligned but no chunk digests are computed (None)."""
    from ..dtypes import by_name, raw_bytes

    hasher = RowHasher(meta, where, chunk_rows if chunk_digests else None)
    step = max(1, block_bytes // max(1, meta.row_numel * by_name(meta.dtype).itemsize))
    if chunk_rows and step > chunk_rows:
        step -= step % chunk_rows
    for start in range(0, meta.rows if meta.numel else 0, step):
        stop = min(meta.rows, start + step)
        hasher.update(start, raw_bytes(read_rows(start, stop)), stop - start)
    return hasher.hexdigest(), hasher.chunk_digests()


def checksum_rows(meta: TensorMeta, read_rows, where: str, block_bytes: int = 64 * 1024 * 1024) -> str:
    """Checksum of a stored tensor, read back ``block_bytes`` at a time with ``read_rows(start, stop)``."""
    return digest_rows(meta, read_rows, where, None, block_bytes)[0]


def checksum_bytes(data) -> str:
    """The checksum string of a bytes-like object, in the form manifests record."""
    return f"{CHECKSUM_ALGO}:{hashlib.new(CHECKSUM_ALGO, data).hexdigest()}"


_FORBIDDEN_CHARS = {"/", "\\", "\x00"}
_RESERVED_NAMES = {"zarr.json"}   # the tensors group's own metadata file


def check_tensor_name(name: str, where: str = "") -> str:
    """Return ``name`` if it is safe as a storage key, else raise InvalidTensorName.

    Safe means: non-empty, at most 255 bytes, no path separators, NUL or control characters,
    not ``.``/``..``, not starting with ``.`` or ``__`` (reserved by zarr).
    """
    problem = None
    if not isinstance(name, str) or not name:
        problem = "it is empty or not a string"
    elif not _encodes(name):
        problem = "it is not valid Unicode text (a lone surrogate)"
    elif name in _RESERVED_NAMES:
        problem = "it is reserved by the Zarr layout"
    elif len(name.encode("utf-8")) > 255:
        problem = "it is longer than 255 bytes"
    elif any(c in _FORBIDDEN_CHARS or ord(c) < 32 for c in name):
        problem = "it contains a path separator, NUL or control character"
    elif name.startswith(".") or name.startswith("__"):
        problem = "it starts with '.' or '__'"
    if problem:
        prefix = f"{where}: " if where else ""
        shown = repr(name) if isinstance(name, str) and _encodes(name) else ascii(name)
        raise InvalidTensorName(f"{prefix}tensor name {shown} is not allowed: {problem}")
    return name


def _encodes(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
