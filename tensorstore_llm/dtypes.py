"""One place for dtype names and their torch / numpy / safetensors / bit-pattern forms.

Zarr and numpy have no bfloat16 or float8, so those are stored as their unsigned bit patterns
(uint16 / uint8) and the logical dtype is recorded next to them. Converting to and from storage
is a reinterpretation of the same bytes, never a numeric cast, so every dtype round-trips
bit-exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import DTypeError


@dataclass(frozen=True)
class DType:
    """A logical tensor dtype and how it is held in each format."""

    name: str            # canonical name, e.g. "bfloat16"
    torch: torch.dtype
    storage: np.dtype    # numpy dtype of the stored elements (bit pattern for bf16 / fp8)
    safetensors: str     # dtype code in safetensors headers, e.g. "BF16"
    is_float: bool

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize


def _d(name, tdt, storage, code, is_float):
    return DType(name, tdt, np.dtype(storage), code, is_float)


_ALL = [
    _d("bfloat16", torch.bfloat16, "<u2", "BF16", True),
    _d("float16", torch.float16, "<f2", "F16", True),
    _d("float32", torch.float32, "<f4", "F32", True),
    _d("float64", torch.float64, "<f8", "F64", True),
    _d("int8", torch.int8, "i1", "I8", False),
    _d("uint8", torch.uint8, "u1", "U8", False),
    _d("int16", torch.int16, "<i2", "I16", False),
    _d("int32", torch.int32, "<i4", "I32", False),
    _d("int64", torch.int64, "<i8", "I64", False),
    _d("bool", torch.bool, "?", "BOOL", False),
]
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _ALL.append(_d(_name, getattr(torch, _name), "u1", _code, True))

_BY_NAME = {d.name: d for d in _ALL}
_BY_TORCH = {d.torch: d for d in _ALL}
_BY_CODE = {d.safetensors: d for d in _ALL}
_ALIASES = {
    "bf16": "bfloat16", "fp16": "float16", "half": "float16", "f16": "float16",
    "fp32": "float32", "float": "float32", "f32": "float32", "fp64": "float64", "double": "float64",
    "i8": "int8", "u8": "uint8",
}
# Storage numpy types that are not the logical type (bit patterns).
_BIT_PATTERN_VIEW = {"bfloat16": torch.int16, "float8_e4m3fn": torch.uint8, "float8_e5m2": torch.uint8}


def by_name(name: str) -> DType:
    """Look up a dtype by canonical name or common alias (``bf16``, ``fp16``, ``fp32`` ...).

    Example:
        >>> by_name("bf16").safetensors
        'BF16'
    """
    key = _ALIASES.get(str(name).lower(), str(name).lower()).removeprefix("torch.")
    if key not in _BY_NAME:
        raise DTypeError(f"unknown dtype {name!r}; known: {', '.join(sorted(_BY_NAME))}")
    return _BY_NAME[key]


def from_torch(dtype: torch.dtype) -> DType:
    """The DType of a torch dtype; raises DTypeError for dtypes we cannot store."""
    if dtype not in _BY_TORCH:
        raise DTypeError(f"torch dtype {dtype} cannot be stored; supported: {', '.join(sorted(_BY_NAME))}")
    return _BY_TORCH[dtype]


def from_safetensors(code: str) -> DType:
    """The DType of a safetensors header dtype code such as ``BF16``."""
    if code not in _BY_CODE:
        raise DTypeError(f"safetensors dtype {code!r} is not supported; supported: {', '.join(sorted(_BY_CODE))}")
    return _BY_CODE[code]


def names() -> list[str]:
    """All canonical dtype names."""
    return sorted(_BY_NAME)


def to_storage(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view (no copy when contiguous) of a CPU tensor's elements in their storage dtype."""
    dt = from_torch(tensor.dtype)
    tensor = tensor.contiguous()
    view = _BIT_PATTERN_VIEW.get(dt.name)
    if view is not None:
        return tensor.view(view).numpy().view(dt.storage)
    return tensor.numpy()


def from_storage(array: np.ndarray, dtype: DType | str) -> torch.Tensor:
    """Reinterpret stored elements as a torch tensor of the logical dtype (shares memory)."""
    dt = dtype if isinstance(dtype, DType) else by_name(dtype)
    array = np.asarray(array)  # zarr hands back numpy scalars for 0-d arrays
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)  # (never for 0-d arrays: it would make them 1-d)
    if array.dtype.itemsize != dt.itemsize:
        raise DTypeError(f"stored elements are {array.dtype}, which cannot hold {dt.name}")
    view = _BIT_PATTERN_VIEW.get(dt.name)
    if view is not None:
        np_view = np.int16 if view is torch.int16 else np.uint8
        return torch.from_numpy(array.view(np_view)).view(dt.torch)
    return torch.from_numpy(array.view(dt.storage))


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as little-endian bytes in C order (what checksums and files hold)."""
    if tensor.numel() == 0:
        return memoryview(b"")
    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def from_bytes(buffer, dtype: DType | str, shape) -> torch.Tensor:
    """A tensor over a writable bytes-like buffer holding little-endian elements (no copy)."""
    dt = dtype if isinstance(dtype, DType) else by_name(dtype)
    array = np.frombuffer(buffer, dtype=dt.storage)
    return from_storage(array, dt).reshape(tuple(shape))
