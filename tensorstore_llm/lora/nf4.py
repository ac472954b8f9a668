"""NF4 (QLoRA's 4-bit NormalFloat) quantisation, following bitsandbytes bit for bit.

QLoRA (Dettmers et al. 2023) trains a LoRA against the NF4-dequantised base. Merging that adapter
into the bf16 original adds the quantisation error q = W16 - dequant(NF4(W16)) to every merged
layer, so a faithful merge dequantises first. The format, as bitsandbytes writes it:

- 16 code values: quantiles of N(0, 1) normalised to [-1, 1] (``create_normal_map(0.9677083)``),
  exactly 0 included; each element is the index of the nearest code (ties between two codes go
  up, as ``torch.bucketize`` on the midpoints does);
- one absmax (fp32) per block of 64 consecutive elements of the flattened tensor; values are
  scaled by 1/absmax and clamped to [-1, 1]; two 4-bit indices per byte, first one in the high
  nibble;
- double quantisation (``compress_statistics``): offset = mean(absmax) (torch's mean, as
  bitsandbytes takes it); absmax - offset is quantised to 8 bits with bitsandbytes' signed dynamic
  map in blocks of 256, one fp32 absmax per block, by the rule of bitsandbytes' compiled CPU
  kernel (``quantize_cpu_impl`` in csrc/cpu_ops.cpp, 0.50): each value v, scaled by 1/absmax and
  clamped to [-1, 1], is mapped to u = (v + 1) * 0.5 * 65535 + 0.5 truncated to 16 bits, and
  u picks its code from a 65536-entry table whose entry i is the first code whose midpoint with
  the next code is not below -1 + 2i/65535 (all in fp32). That is the nearest code except for
  values within ~1/65535 of a midpoint, where the table's grid decides; a block whose absmax is 0
  gets code 0. (bitsandbytes' CUDA kernel searches the map instead, so a GPU-made state can differ
  from this in such near-midpoint codes; dequantising a stored state, :func:`from_bnb_state_dict`,
  is exact whatever made it.)

Dequantisation: absmax = code8[q8] * absmax2 + offset (fp32), W = code4[q4] * absmax (fp32), then
one rounding to the output dtype.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FormatError

#: bitsandbytes' NF4 table (functional.get_4bit_type("nf4")), as fp32.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)


def normal_map(offset: float = 0.9677083) -> torch.Tensor:
    """NF4's code derived from the normal distribution (QLoRA's construction), fp32.

    8 positive quantiles Phi^-1(linspace(offset, 0.5, 9)[:-1]), 7 negative ones
    -Phi^-1(linspace(offset, 0.5, 8)[:-1]) and 0, sorted and divided by the largest.
    Equals :data:`NF4_CODE` to fp32 rounding (the table is what bitsandbytes ships).
    """
    def ppf(p: torch.Tensor) -> torch.Tensor:
        return math.sqrt(2.0) * torch.special.erfinv(2 * p.double() - 1)

    pos = ppf(torch.linspace(offset, 0.5, 9)[:-1])
    neg = -ppf(torch.linspace(offset, 0.5, 8)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.max()).float()


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic code (``create_dynamic_map``, Dettmers 2015), used for the
    double quantisation of NF4's absmax: per exponent 10^-(6-i), fraction values at the
    midpoints of linspace(0.1, 1, 2^(i+...)+1) (fp32), with both signs, plus 0 and 1; sorted."""
    data: list[float] = []
    non_sign = total_bits - 1
    additional = 2 ** (non_sign - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign - max_exponent_bits) + 1 if signed
                    else 2 ** (i + non_sign - max_exponent_bits + 1) + 1)
        b = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional > 0:
        b = torch.linspace(0.1, 1, additional + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def _blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the nearest code per element after scaling each block by 1/absmax; absmax."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().max(dim=-1)[0]
    inverse = 1.0 / absmax.clamp(min=1e-38).view(-1, 1)
    scaled = torch.clamp(flat[:full].reshape(-1, blocksize) * inverse, -1, 1).reshape(-1)
    if full < n:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True), absmax


LUT_SIZE = 65536


@functools.cache
def _dynamic_lut() -> torch.Tensor:
    """bitsandbytes' CPU lookup table for the 8-bit dynamic map (``build_quantize_lut``): entry i
    is the number of code midpoints below -1 + 2i / 65535, all in fp32 (numpy float32 ops)."""
    code = dynamic_map(signed=True).numpy()
    mid = np.float32(0.5) * (code[:-1] + code[1:])                       # 255 midpoints, fp32
    grid = np.float32(-1.0) + (np.float32(2.0) * np.arange(LUT_SIZE, dtype=np.float32)) / np.float32(LUT_SIZE - 1)
    return torch.from_numpy(np.searchsorted(mid, grid, side="left").astype(np.uint8))


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic-map codes and fp32 absmax per block of ``x`` (flattened), as bitsandbytes'
    ``quantize_blockwise(x, blocksize=blocksize)`` computes them on CPU (its compiled kernel's
    lookup-table rule, see the module note), bit for bit.

    Args:
        x: fp32 tensor (NF4's double quantisation passes absmax - offset).
    Returns:
        (uint8 codes, one per element, shape of ``x``; fp32 absmax per block).

    >>> q, absmax = quantize_blockwise_8bit(torch.tensor([0.5, -1.0, 0.0]))
    >>> q, absmax                     # 0 maps to code 131 (2.1e-5): the table's grid, as in bitsandbytes
    (tensor([219,   0, 131], dtype=torch.uint8), tensor([1.]))
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.zeros(n_blocks * blocksize, dtype=torch.float32)    # zeros never raise a block's absmax
    padded[:n] = flat
    blocks = padded.view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = 1.0 / absmax                                                  # fp32, as the kernel's 1.0f / absmax
    v = torch.clamp(blocks * inv.view(-1, 1), -1, 1)
    u = ((v + 1.0) * 0.5 * float(LUT_SIZE - 1) + 0.5).to(torch.int32)  # fp32 ops, truncated like the uint16 cast
    q = _dynamic_lut()[u.clamp(0, LUT_SIZE - 1).long()]
    q[absmax == 0] = 0                                                  # the kernel writes 0 for an all-zero block
    return q.reshape(-1)[:n].reshape(x.shape), absmax


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(-1)
    if full < n:
        out[full:] = values[full:] * absmax[-1]
    return out


@dataclass
class NF4Tensor:
    """An NF4-quantised tensor in bitsandbytes' layout.

    ``packed``: uint8, ceil(n / 2) bytes (bitsandbytes keeps shape (bytes, 1)); ``absmax``: fp32 per
    block, or uint8 codes when double-quantised (then ``offset``, ``absmax2`` per 256 absmax values,
    ``code2``); ``shape`` / ``dtype``: the original tensor's.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = 64
    offset: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    blocksize2: int = 256
    code: torch.Tensor = NF4_CODE
    code2: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax per 64-block (double quantisation undone)."""
        if not self.double_quant:
            return self.absmax.float()
        return _scale_blocks(self.code2[self.absmax.long()], self.absmax2, self.blocksize2) + self.offset


def quantize_nf4(x: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """NF4-quantise ``x`` exactly as ``bitsandbytes.functional.quantize_4bit(x, blocksize=64,
    quant_type="nf4", compress_statistics=double_quant)`` does on CPU.

    Args:
        x: fp32, fp16 or bf16 tensor of any shape.
    Returns:
        :class:`NF4Tensor`; ``dequantize_nf4`` gives the weights a QLoRA adapter was trained against.

    >>> q = quantize_nf4(torch.randn(4, 64))
    >>> dequantize_nf4(q).shape
    torch.Size([4, 64])
    """
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise FormatError(f"NF4 quantises fp32 / fp16 / bf16 tensors, got {x.dtype}")
    q, absmax = _blockwise(x, NF4_CODE, blocksize)
    if q.numel() % 2:                                               # bitsandbytes pads with the value 0
        q = torch.cat([q, torch.full((1,), 7, dtype=q.dtype)])
    q8 = q.to(torch.uint8)
    packed = ((q8[::2] << 4) | q8[1::2]).unsqueeze(1)               # high nibble first
    out = NF4Tensor(packed=packed, absmax=absmax, shape=tuple(x.shape), dtype=x.dtype, blocksize=blocksize)
    if double_quant:
        q2, absmax2, offset = double_quantize(absmax)
        out.absmax, out.offset, out.absmax2, out.code2 = q2, offset, absmax2, dynamic_map(signed=True)
    return out


def double_quantized_absmax(absmax: torch.Tensor, blocksize2: int = 256) -> torch.Tensor:
    """The fp32 absmax per 64-block that dequantisation multiplies by when ``quantize_nf4`` stored
    ``absmax`` double-quantised: offset = mean(absmax), 8-bit dynamic codes of absmax - offset in
    blocks of ``blocksize2``, decoded and offset again (the same operations, so the same bits).

    >>> x = torch.randn(64 * 300)
    >>> torch.equal(double_quantized_absmax(quantize_nf4(x, double_quant=False).absmax), quantize_nf4(x).block_absmax())
    True
    """
    if absmax.numel() == 0:
        return absmax.float()
    q2, absmax2, offset = double_quantize(absmax, blocksize2)
    return _scale_blocks(dynamic_map(signed=True)[q2.long()], absmax2, blocksize2) + offset


def double_quantize(absmax: torch.Tensor, blocksize2: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' double quantisation of NF4's fp32 absmaxes: (uint8 codes, fp32 absmax per
    ``blocksize2`` codes, fp32 offset = mean(absmax)), as ``quantize_4bit(compress_statistics=True)``.

    >>> q2, absmax2, offset = double_quantize(torch.tensor([1.0, 3.0]))
    >>> float(offset), absmax2
    (2.0, tensor([1.]))
    """
    offset = absmax.float().mean()
    q2, absmax2 = quantize_blockwise_8bit(absmax.float() - offset, blocksize2)
    return q2, absmax2, offset


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """code[index] * absmax in fp32, rounded once to ``dtype`` (default: the original dtype).

    Matches ``bitsandbytes.functional.dequantize_4bit`` bit for bit.
    """
    n = math.prod(t.shape)
    p = t.packed.reshape(-1)
    idx = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n].long()
    values = _scale_blocks(t.code[idx], t.block_absmax(), t.blocksize)
    return values.reshape(t.shape).to(dtype or t.dtype)


def nf4_roundtrip(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """dequant(NF4(x)): the base weights a QLoRA adapter saw during training."""
    return dequantize_nf4(quantize_nf4(x), dtype)


def quantization_error_ratio(weight: torch.Tensor, delta: torch.Tensor) -> float:
    """||q|| / ||delta|| with q = W - dequant(NF4(W)): how much merging into the unquantised
    weight adds next to the adapter's own update (Unsloth measured 10-150x per layer). The
    dequantised weight is taken in W's dtype, as bitsandbytes hands it to the layer in training."""
    q = weight.float() - nf4_roundtrip(weight).float()
    dn = float(delta.float().norm())
    return float(q.norm()) / dn if dn > 0 else math.inf


def from_bnb_state_dict(tensors: dict[str, torch.Tensor], name: str) -> NF4Tensor:
    """Read a bitsandbytes NF4 weight saved in a checkpoint (``Linear4bit`` state dict, as
    transformers saves ``load_in_4bit`` models): ``<name>``, ``<name>.absmax``,
    ``<name>.quant_map``, ``<name>.quant_state.bitsandbytes__nf4`` (JSON bytes) and, when
    double-quantised, ``<name>.nested_absmax`` and ``<name>.nested_quant_map``.

    Raises FormatError naming the tensor when a part is missing or the quant type is not nf4.
    """
    key = name + ".quant_state.bitsandbytes__nf4"
    if key not in tensors:
        if name + ".quant_state.bitsandbytes__fp4" in tensors:
            raise FormatError(f"{name}: bitsandbytes FP4 weights are not supported (NF4 only)")
        raise FormatError(f"{name}: no {key}; not a bitsandbytes NF4 weight")
    try:
        meta = json.loads(bytes(tensors[key].numpy().astype("uint8")).decode("utf-8"))
        nested = "nested_offset" in meta
        return NF4Tensor(
            packed=tensors[name], absmax=tensors[name + ".absmax"], shape=tuple(meta["shape"]),
            dtype=getattr(torch, meta["dtype"]), blocksize=int(meta["blocksize"]),
            code=tensors[name + ".quant_map"].float(),
            offset=torch.tensor(float(meta["nested_offset"])) if nested else None,
            absmax2=tensors[name + ".nested_absmax"] if nested else None,
            blocksize2=int(meta.get("nested_blocksize", 256)),
            code2=tensors[name + ".nested_quant_map"].float() if nested else None)
    except KeyError as e:
        raise FormatError(f"{name}: bitsandbytes NF4 weight is missing {e.args[0]}") from None


def quant_state_bytes(shape, dtype: torch.dtype, offset: float | None, blocksize: int = 64,
                      blocksize2: int = 256) -> torch.Tensor:
    """The ``<name>.quant_state.bitsandbytes__nf4`` tensor: bitsandbytes' JSON of the non-tensor
    state (``QuantState.as_dict(packed=True)``: same keys, order and ``json.dumps`` spacing), as uint8."""
    meta = {"quant_type": "nf4", "blocksize": blocksize, "dtype": str(dtype).removeprefix("torch."),
            "shape": list(shape)}
    if offset is not None:
        meta.update({"nested_blocksize": blocksize2, "nested_dtype": "float32", "nested_offset": float(offset)})
    return torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)


def to_bnb_state_dict(t: NF4Tensor, name: str) -> dict[str, torch.Tensor]:
    """The tensors transformers + bitsandbytes save for a ``Linear4bit`` weight ``name`` (the
    inverse of :func:`from_bnb_state_dict`): ``name`` (packed uint8, (bytes, 1)), ``.absmax``,
    ``.quant_map`` and, double-quantised, ``.nested_absmax``, ``.nested_quant_map``; then
    ``.quant_state.bitsandbytes__nf4``. Equal, tensor for tensor, to bitsandbytes'
    ``{name: packed, **{name + "." + k: v for k, v in state.as_dict(packed=True).items()}}``.

    >>> sorted(to_bnb_state_dict(quantize_nf4(torch.randn(2, 64)), "w"))[:3]
    ['w', 'w.absmax', 'w.nested_absmax']
    """
    out = {name: t.packed.reshape(-1, 1), name + ".absmax": t.absmax, name + ".quant_map": t.code.float()}
    if t.double_quant:
        out.update({name + ".nested_absmax": t.absmax2, name + ".nested_quant_map": t.code2.float().clone()})
    out[name + ".quant_state.bitsandbytes__nf4"] = quant_state_bytes(
        t.shape, t.dtype, float(t.offset) if t.double_quant else None, t.blocksize, t.blocksize2)
    return out


def bnb_quantization_config(compute_dtype: str = "bfloat16") -> dict:
    """config.json's ``quantization_config`` for an NF4, double-quantised checkpoint, as
    transformers' ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True).to_dict()`` writes it (``lm_head`` stays dense, its default)."""
    return {"_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": compute_dtype,
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
            "quant_method": "bitsandbytes"}
