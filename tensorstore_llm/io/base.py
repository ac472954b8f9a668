"""The two contracts every format implements: TensorSource (read) and TensorSink (write).

Modelled on ``safetensors.safe_open``: few nouns, the same verbs everywhere. Sources hand out CPU
tensors in their stored dtype; sinks take row blocks in order and return a checksum per tensor.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

from ..errors import InvalidTensorName

CHECKSUM_ALGO = "sha256"


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
    """Read access to a set of named tensors; a context manager that closes its files."""

    identity: str  # a string that changes whenever the content may have changed

    def keys(self) -> list[str]: ...
    def meta(self, name: str) -> TensorMeta: ...
    def read(self, name: str): ...
    def read_rows(self, name: str, start: int, stop: int): ...
    def close(self) -> None: ...


@runtime_checkable
class TensorSink(Protocol):
    """Write access: ``prepare`` once, then each tensor's row blocks in order, then ``commit``."""

    def prepare(self, metas: Iterable[TensorMeta]) -> None: ...
    def preferred_rows(self, meta: TensorMeta) -> int: ...
    def completed(self) -> dict[str, str]: ...
    def write_rows(self, name: str, start: int, block) -> None: ...
    def finish(self, name: str) -> str: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class SourceBase:
    """Shared behaviour of sources: context management and whole-tensor reads via rows."""

    identity = ""

    def read(self, name: str):
        """The whole tensor ``name`` as a CPU tensor of its stored dtype."""
        meta = self.meta(name)
        block = self.read_rows(name, 0, meta.rows)
        return block.reshape(meta.shape)

    def metas(self) -> list[TensorMeta]:
        return [self.meta(k) for k in self.keys()]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RowHasher:
    """Checksums a tensor from row blocks that must arrive in order; catches gaps and overlaps."""

    def __init__(self, meta: TensorMeta, where: str):
        self.meta, self.where = meta, where
        self.next_row = 0
        self._hash = hashlib.new(CHECKSUM_ALGO)

    def update(self, start: int, raw: memoryview, rows: int) -> None:
        if start != self.next_row:
            raise ValueError(f"{self.where}: tensor {self.meta.name!r} got rows from {start}, expected {self.next_row}")
        self._hash.update(raw)
        self.next_row += rows

    def hexdigest(self) -> str:
        if self.next_row != self.meta.rows and self.meta.numel:
            raise ValueError(f"{self.where}: tensor {self.meta.name!r} finished after {self.next_row} of {self.meta.rows} rows")
        return f"{CHECKSUM_ALGO}:{self._hash.hexdigest()}"


def checksum_rows(meta: TensorMeta, read_rows, where: str, block_bytes: int = 64 * 1024 * 1024) -> str:
    """Checksum of a stored tensor, read back ``block_bytes`` at a time with ``read_rows(start, stop)``."""
    from ..dtypes import by_name, raw_bytes

    hasher = RowHasher(meta, where)
    step = max(1, block_bytes // max(1, meta.row_numel * by_name(meta.dtype).itemsize))
    for start in range(0, meta.rows if meta.numel else 0, step):
        stop = min(meta.rows, start + step)
        hasher.update(start, raw_bytes(read_rows(start, stop)), stop - start)
    return hasher.hexdigest()


def checksum_bytes(data) -> str:
    """The checksum string of a bytes-like object, in the form manifests record."""
    return f"{CHECKSUM_ALGO}:{hashlib.new(CHECKSUM_ALGO, data).hexdigest()}"


_FORBIDDEN_CHARS = {"/", "\\", "\x00"}


def check_tensor_name(name: str, where: str = "") -> str:
    """Return ``name`` if it is safe as a storage key, else raise InvalidTensorName.

    Safe means: non-empty, at most 255 bytes, no path separators, NUL or control characters,
    not ``.``/``..``, not starting with ``.`` or ``__`` (reserved by zarr).
    """
    problem = None
    if not isinstance(name, str) or not name:
        problem = "it is empty or not a string"
    elif len(name.encode("utf-8", "surrogatepass")) > 255:
        problem = "it is longer than 255 bytes"
    elif any(c in _FORBIDDEN_CHARS or ord(c) < 32 for c in name):
        problem = "it contains a path separator, NUL or control character"
    elif name.startswith(".") or name.startswith("__"):
        problem = "it starts with '.' or '__'"
    if problem:
        prefix = f"{where}: " if where else ""
        raise InvalidTensorName(f"{prefix}tensor name {name!r} is not allowed: {problem}")
    return name
