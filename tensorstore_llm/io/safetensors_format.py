"""The safetensors container: a validated header parser, a header builder and positional I/O.

We parse headers ourselves instead of calling ``safe_open`` so that every malformation becomes a
FormatError naming the file, reads of a block of rows touch only those bytes, and writes can go
straight to their final offset (resumable, no whole file in memory). Layout: 8-byte little-endian
header length N, N bytes of JSON, then the tensor data, contiguous and in offset order.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from ..dtypes import by_name, from_safetensors
from ..errors import DTypeError, FormatError
from .base import TensorMeta, check_tensor_name

MAX_HEADER_BYTES = 100 * 1024 * 1024  # same cap as the reference implementation
MAX_NDIM = 32
MAX_BYTES = 2**63 - 1  # byte counts and offsets are signed 64-bit in safetensors readers


@dataclass(frozen=True)
class Entry:
    """One tensor in a safetensors file: its meta and absolute byte range in the file."""

    meta: TensorMeta
    start: int  # absolute file offset of the first byte
    stop: int


@dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]
    metadata: dict[str, str]
    data_start: int


def parse_header(path: str, fd: int, file_size: int) -> Header:
    """Read and validate the header of an open safetensors file.

    Raises FormatError (naming ``path``) for anything a correct writer would not produce:
    short file, absurd header length, invalid JSON, unknown dtype, bad shape, offsets that overlap,
    leave holes, disagree with the shape, or point past the end of the file.
    """
    if file_size < 8:
        raise FormatError(f"{path}: not a safetensors file ({file_size} bytes, the header length alone needs 8)")
    n = int.from_bytes(_pread_exact(path, fd, 8, 0), "little")
    if n > MAX_HEADER_BYTES or n > file_size - 8:
        raise FormatError(f"{path}: header length {n} is larger than the file ({file_size} bytes) or the {MAX_HEADER_BYTES}-byte cap; file truncated or not safetensors")
    raw = _pread_exact(path, fd, n, 8)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: header is not valid UTF-8 JSON ({e.__class__.__name__}: {str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    entries = {name: _parse_entry(path, name, info, data_start) for name, info in header.items()}
    _check_layout(path, entries, data_start, file_size)
    return Header(entries, metadata, data_start)


def _parse_entry(path: str, name: str, info, data_start: int) -> Entry:
    where = f"{path}: tensor {name!r}"
    check_tensor_name(name, path)
    if not isinstance(info, dict):
        raise FormatError(f"{where}: entry must be an object with dtype, shape, data_offsets")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    try:
        dt = from_safetensors(code) if isinstance(code, str) else None
    except DTypeError as e:
        raise FormatError(f"{where}: {e}") from None
    if dt is None:
        raise FormatError(f"{where}: dtype must be a string, got {code!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise FormatError(f"{where}: shape must be a list of at most {MAX_NDIM} non-negative integers, got {str(shape)[:80]}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise FormatError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {str(offsets)[:80]}")
    check_shape_size(where, shape, dt.itemsize)
    expected = math.prod(shape) * dt.itemsize
    if offsets[1] - offsets[0] != expected:
        raise FormatError(f"{where}: shape {shape} of {dt.name} needs {expected} bytes but data_offsets span {offsets[1] - offsets[0]}")
    meta = TensorMeta(name, tuple(shape), dt.name)
    return Entry(meta, data_start + offsets[0], data_start + offsets[1])


def check_shape_size(where: str, shape, itemsize: int) -> None:
    """FormatError unless ``shape``'s dimensions, zeros left out, multiply to at most ``MAX_BYTES`` bytes.

    A zero-size tensor such as ``[2**62, 2**62, 0]`` holds no data, yet readers that multiply its
    dimensions (safetensors does, in 64 bits) overflow and refuse the file; so do we, up front.
    """
    size = itemsize
    for d in shape:
        size *= d or 1
    if size > MAX_BYTES:
        raise FormatError(f"{where}: shape {list(shape)[:MAX_NDIM]} is too large: its non-zero dimensions times "
                          f"{itemsize} bytes per element exceed 2^63-1 bytes, which safetensors files cannot describe")


def _check_layout(path: str, entries: dict[str, Entry], data_start: int, file_size: int) -> None:
    position = data_start
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.stop)):
        if entry.start != position:
            kind = "overlaps the previous tensor" if entry.start < position else "leaves a gap before it"
            raise FormatError(f"{path}: tensor {entry.meta.name!r} starts at data offset {entry.start - data_start}, which {kind}")
        position = entry.stop
    if position > file_size:
        raise FormatError(f"{path}: truncated: the header declares {position - data_start} bytes of tensor data, the file holds {file_size - data_start}")
    if position < file_size:
        raise FormatError(f"{path}: {file_size - position} trailing bytes after the last tensor; file corrupt or not safetensors")


def build_header(metas: list[TensorMeta], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """Serialise a header for ``metas`` in the given order, padded to 8 bytes.

    Returns:
        (the bytes to put at the start of the file, each tensor's absolute file offset).
    """
    body: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    relative, position = {}, 0
    for meta in metas:
        if len(meta.shape) > MAX_NDIM:
            raise FormatError(f"tensor {meta.name!r}: {len(meta.shape)} dimensions; safetensors files hold at most {MAX_NDIM}")
        check_shape_size(f"tensor {meta.name!r}", meta.shape, by_name(meta.dtype).itemsize)
        size = meta.numel * by_name(meta.dtype).itemsize
        body[meta.name] = {"dtype": by_name(meta.dtype).safetensors, "shape": list(meta.shape),
                           "data_offsets": [position, position + size]}
        relative[meta.name] = position
        position += size
    text = json.dumps(body, separators=(",", ":")).encode()
    text += b" " * (-(len(text)) % 8)
    prefix = len(text).to_bytes(8, "little") + text
    return prefix, {name: len(prefix) + off for name, off in relative.items()}


def _pread_exact(path: str, fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise FormatError(f"{path}: truncated: wanted {size} bytes at offset {offset}, got {len(data)}")
    return data


def pread_into(path: str, fd: int, buffer: memoryview, offset: int) -> None:
    """Fill ``buffer`` from ``fd`` starting at ``offset``; FormatError if the file ends first."""
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise FormatError(f"{path}: truncated: file ended {len(buffer) - done} bytes early at offset {offset + done}")
        done += got


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (loops over short writes)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)
