"""Delta codecs: small frozen dataclasses that turn (base block, fine-tune block) into bytes and back.

Every codec has ``encode(base, target, tensor=..., start=...) -> bytes``,
``decode(base, data, tensor=..., start=...) -> tensor`` and ``to_dict`` / :func:`codec_from_dict`,
and is registered by name (:func:`register_codec`, like ops; zarr-python's codecs are the model).
``tensor`` and ``start`` (the block's first row) matter only to seeded codecs (DARE); blocks of
rows may be coded independently.

- ``exact``: the bit-exact ULP-difference delta of :mod:`.exact` (bf16, fp16, fp32).
- lossy (:mod:`.lossy` kernels): ``bf16``, ``low-rank``, ``top-k``, ``dare``, ``bitdelta``,
  ``mixed-svd``. Decoding returns ``base + Δ̂`` rounded to the base's dtype. Tensors with fewer
  than two dimensions (norms, biases) are always coded exactly, inside the same payload.

Lossy payload: ``TSDL`` | u32 header length | JSON header (codec, shape, parts) | zstd of the parts.

Example:
    >>> import torch
    >>> codec = get_codec("bitdelta", per_row=True)
    >>> codec_from_dict(codec.to_dict()) == codec
    True
"""
from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import CodecError
from . import exact, lossy

_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_REGISTRY: dict[str, type] = {}
LOSSY_MAGIC = b"TSDL"


def register_codec(cls: type, clobber: bool = False) -> type:
    """Register a codec class under ``cls.name``; an existing name is an error unless ``clobber``."""
    name = cls.name
    if name in _REGISTRY and _REGISTRY[name] is not cls and not clobber:
        raise CodecError(f"codec {name!r} is already registered; pass clobber=True to replace it")
    _REGISTRY[name] = cls
    return cls


def list_codecs() -> list[str]:
    """Names of the registered delta codecs."""
    return sorted(_REGISTRY)


def get_codec(name: str, **params):
    """An instance of codec ``name`` with ``params``; CodecError naming the known codecs otherwise."""
    if name not in _REGISTRY:
        raise CodecError(f"unknown delta codec {name!r}; known: {', '.join(list_codecs())}")
    _check_types(name, _REGISTRY[name], params)
    try:
        return _REGISTRY[name](**params)
    except TypeError as exc:
        raise CodecError(f"codec {name!r}: {exc}") from None


_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,)}


def _check_types(name: str, cls: type, params: dict) -> None:
    """Numbers and flags where the codec's fields declare them (CodecError naming the parameter),
    so ``--param rank=abc`` fails here and not deep inside an encode."""
    for f in dataclasses.fields(cls):
        if f.name not in params:
            continue
        value, allowed = params[f.name], [t.strip() for t in str(f.type).split("|")]
        kinds = tuple(k for t in allowed for k in _KINDS.get(t, ()))
        if not kinds or (value is None and "None" in allowed):
            continue   # other types (tuples of groups) are checked by the codec itself
        wrong_bool = isinstance(value, bool) and bool not in kinds
        if wrong_bool or not isinstance(value, kinds) or (isinstance(value, float) and not math.isfinite(value)):
            raise CodecError(f"codec {name!r}: parameter {f.name} must be {f.type}, got {value!r}")


def codec_from_dict(d: dict):
    """The codec a ``to_dict()`` describes: ``{"name": ..., **params}``."""
    d = dict(d)
    return get_codec(d.pop("name"), **d)


def _fmt(t: torch.Tensor) -> str:
    if t.dtype not in _DTYPES:
        raise CodecError(f"delta codecs take bf16 / fp16 / fp32 tensors, got {t.dtype}")
    return _DTYPES[t.dtype]


class _Codec:
    name: ClassVar[str]

    def to_dict(self) -> dict:
        """``{"name": ..., **params}``; :func:`codec_from_dict` inverts it."""
        return {"name": self.name, **dataclasses.asdict(self)}

    def _check(self, base: torch.Tensor, target: torch.Tensor) -> str:
        if base.shape != target.shape or base.dtype != target.dtype:
            raise CodecError(f"{self.name}: base {tuple(base.shape)} {base.dtype} and target "
                             f"{tuple(target.shape)} {target.dtype} differ")
        return _fmt(base)


@register_codec
@dataclass(frozen=True)
class ExactDelta(_Codec):
    """Bit-exact delta: ULP differences sorted by the base's exponent, zstd-coded (see :mod:`.exact`).

    Example:
        >>> b = torch.randn(8, 8).bfloat16(); t = (b * 1.01).bfloat16()
        >>> torch.equal(ExactDelta().decode(b, ExactDelta().encode(b, t)), t)
        True
    """

    name: ClassVar[str] = "exact"
    level: int | None = None      # None: zstd as a pure Huffman literal coder (see exact.encode_delta)

    def encode(self, base: torch.Tensor, target: torch.Tensor, tensor: str = "", start: int = 0) -> bytes:
        """Bytes that rebuild ``target`` bit for bit from ``base``."""
        return exact.encode_delta(base, target, self._check(base, target), level=self.level)

    def decode(self, base: torch.Tensor, data: bytes, tensor: str = "", start: int = 0) -> torch.Tensor:
        """``target``, bit for bit."""
        return exact.decode_delta(base, data)


class _LossyCodec(_Codec):
    """Shared framing of the lossy codecs: kernel on Δ (fp32), parts to bytes, 1-D tensors exact."""

    def approximate(self, delta: torch.Tensor, tensor: str = "", start: int = 0) -> lossy.Lossy:
        raise NotImplementedError

    def rebuild(self, parts: dict, shape: tuple, meta: dict, tensor: str, start: int) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, base: torch.Tensor, target: torch.Tensor, tensor: str = "", start: int = 0) -> bytes:
        """Bytes of the approximated delta (or of an exact delta for tensors with < 2 dims)."""
        fmt = self._check(base, target)
        if base.dim() < 2:
            return exact.encode_delta(base, target, fmt)
        delta = target.float() - base.float()
        approx = self.approximate(delta, tensor, start)
        return pack_parts(self.to_dict(), tuple(base.shape), approx.parts, _meta(approx.info))

    def decode(self, base: torch.Tensor, data: bytes, tensor: str = "", start: int = 0) -> torch.Tensor:
        """``base + Δ̂`` in the base's dtype."""
        if data[:4] == exact.MAGIC:
            return exact.decode_delta(base, data)
        header, parts = unpack_parts(data)
        if tuple(header["shape"]) != tuple(base.shape):
            raise CodecError(f"{self.name}: payload for shape {header['shape']}, base is {tuple(base.shape)}")
        approx = self.rebuild(parts, tuple(base.shape), header["meta"], tensor, start)
        return (base.float() + approx).to(base.dtype)


def _meta(info: dict) -> dict:
    return {k: v for k, v in info.items() if isinstance(v, (int, float, bool, str, list))}


def pack_parts(codec: dict, shape: tuple, parts: dict, meta: dict, level: int = 3) -> bytes:
    """Frame named NumPy arrays as a lossy payload (JSON header + one zstd frame)."""
    import zstandard

    listing = [[k, v.dtype.str, list(v.shape)] for k, v in parts.items()]
    header = json.dumps({"codec": codec, "shape": list(shape), "parts": listing, "meta": meta}).encode()
    body = zstandard.ZstdCompressor(level=level).compress(b"".join(np.ascontiguousarray(v).tobytes() for v in parts.values()))
    return LOSSY_MAGIC + struct.pack("<I", len(header)) + header + body


def unpack_parts(data: bytes) -> tuple[dict, dict]:
    """Inverse of :func:`pack_parts`: (header, {name: array})."""
    import zstandard

    if data[:4] != LOSSY_MAGIC or len(data) < 8:
        raise CodecError("not a lossy delta payload")
    (hlen,) = struct.unpack_from("<I", data, 4)
    try:
        header = json.loads(data[8:8 + hlen])
        body = zstandard.ZstdDecompressor().decompress(data[8 + hlen:])
    except (ValueError, zstandard.ZstdError) as exc:
        raise CodecError(f"corrupt lossy delta payload ({exc})") from None
    parts, offset = {}, 0
    for name, dtype, shape in header["parts"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        parts[name] = np.frombuffer(body, dt, count, offset).reshape(shape)
        offset += count * dt.itemsize
    if offset != len(body):
        raise CodecError("corrupt lossy delta payload (parts do not fill the body)")
    return header, parts


def _bf16(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.uint16).view(np.int16)).view(torch.bfloat16).float()


@register_codec
@dataclass(frozen=True)
class Bf16Delta(_LossyCodec):
    """Δ rounded to bf16, dense."""

    name: ClassVar[str] = "bf16"

    def approximate(self, delta, tensor="", start=0):
        return lossy.bf16_round(delta)

    def rebuild(self, parts, shape, meta, tensor, start):
        return _bf16(parts["values"]).reshape(shape)


@register_codec
@dataclass(frozen=True)
class LowRankDelta(_LossyCodec):
    """Truncated randomised SVD at ``rank`` or at ``energy`` (share of ‖Δ‖²); bf16 factors."""

    name: ClassVar[str] = "low-rank"
    rank: int | None = None
    energy: float | None = None
    power_iters: int = 2
    seed: int = 0

    def __post_init__(self):
        if (self.rank is None) == (self.energy is None):
            raise CodecError("low-rank: give exactly one of rank or energy")
        if self.rank is not None and self.rank < 1:
            raise CodecError(f"low-rank: rank must be >= 1, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise CodecError(f"low-rank: energy must be in (0, 1], got {self.energy}")

    def approximate(self, delta, tensor="", start=0):
        d2 = delta.reshape(delta.shape[0], -1)
        return lossy.low_rank(d2, self.rank, self.energy, self.power_iters, _tensor_seed(self.seed, tensor))

    def rebuild(self, parts, shape, meta, tensor, start):
        return (_bf16(parts["left"]) @ _bf16(parts["right"])).reshape(shape)


@register_codec
@dataclass(frozen=True)
class TopKDelta(_LossyCodec):
    """The ``density`` share of largest-|Δ| entries (bf16 values + a bitmap), per tensor block."""

    name: ClassVar[str] = "top-k"
    density: float = 0.1

    def approximate(self, delta, tensor="", start=0):
        return lossy.top_k(delta, self.density)

    def rebuild(self, parts, shape, meta, tensor, start):
        n = int(np.prod(shape))
        mask = torch.from_numpy(np.unpackbits(parts["mask"])[:n].astype(bool))
        out = torch.zeros(n)
        out[mask] = _bf16(parts["values"])
        return out.reshape(shape)


@register_codec
@dataclass(frozen=True)
class DareDelta(_LossyCodec):
    """DARE: keep each entry with probability ``keep`` (mask from ``seed`` and the tensor name), rescale."""

    name: ClassVar[str] = "dare"
    keep: float = 0.1
    seed: int = 0

    def approximate(self, delta, tensor="", start=0):
        return lossy.dare(delta, self.keep, self.seed, tensor, start)

    def rebuild(self, parts, shape, meta, tensor, start):
        mask = lossy.dare_mask((start + shape[0], *shape[1:]), self.keep, self.seed, tensor, start, start + shape[0])
        out = torch.zeros(shape)
        out[mask] = _bf16(parts["values"])
        return out


@register_codec
@dataclass(frozen=True)
class BitDelta(_LossyCodec):
    """BitDelta: sign(Δ) × mean |Δ| per matrix, or per row with ``per_row``."""

    name: ClassVar[str] = "bitdelta"
    per_row: bool = False

    def approximate(self, delta, tensor="", start=0):
        return lossy.bitdelta(delta, self.per_row)

    def rebuild(self, parts, shape, meta, tensor, start):
        rows, n = shape[0], int(np.prod(shape))
        signs = torch.from_numpy(np.unpackbits(parts["signs"])[:n].astype(bool)).reshape(rows, -1)
        scale = _bf16(parts["scale"]).reshape(-1, 1)
        return torch.where(signs, scale, -scale).reshape(shape)


@register_codec
@dataclass(frozen=True)
class MixedSvdDelta(_LossyCodec):
    """Delta-CoMe-style mixed precision SVD: ``groups`` of (singular vectors, bits), largest first."""

    name: ClassVar[str] = "mixed-svd"
    groups: tuple = ((2, 8), (32, 3), (64, 2))
    power_iters: int = 2
    seed: int = 0

    def __post_init__(self):
        groups = tuple((int(c), int(b)) for c, b in self.groups)
        if not groups or any(c < 1 or not 2 <= b <= 8 for c, b in groups):
            raise CodecError(f"mixed-svd: groups must be (count >= 1, 2 <= bits <= 8) pairs, got {self.groups}")
        object.__setattr__(self, "groups", groups)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["groups"] = [list(g) for g in self.groups]
        return d

    def approximate(self, delta, tensor="", start=0):
        d2 = delta.reshape(delta.shape[0], -1)
        return lossy.mixed_svd(d2, self.groups, self.power_iters, _tensor_seed(self.seed, tensor))

    def rebuild(self, parts, shape, meta, tensor, start):
        rows = shape[0]
        cols = int(np.prod(shape[1:]))
        out = torch.zeros(rows, cols)
        rank_left = meta["rank"]
        done = 0
        for g, (count, bits) in enumerate(self.groups):
            if done >= rank_left:
                break
            width = min(count, rank_left - done)
            scales = _bf16(parts[f"g{g}_scales"])
            left = _unpack_codes(parts[f"g{g}_left"], bits, rows * width).reshape(rows, width) * scales[:width]
            right = _unpack_codes(parts[f"g{g}_right"], bits, cols * width).reshape(cols, width) * scales[width:]
            out += left @ right.T
            done += width
        return out.reshape(shape)


def _unpack_codes(packed: np.ndarray, bits: int, count: int) -> torch.Tensor:
    as_bits = np.unpackbits(packed)[:count * bits].reshape(count, bits)
    full = np.zeros((count, 8), np.uint8)
    full[:, 8 - bits:] = as_bits
    offset = np.packbits(full, axis=1).reshape(-1).astype(np.int16)
    return torch.from_numpy((offset - (1 << (bits - 1))).astype(np.float32))


def _tensor_seed(seed: int, tensor: str) -> int:
    from ..seeding import seed_value

    return seed_value(seed, "delta-svd", tensor)
