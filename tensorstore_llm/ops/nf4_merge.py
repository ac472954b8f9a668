"""Streamed QLoRA merge: W' = dequant(NF4(W)) + s·B·A, row block by row block.

QLoRA (Dettmers et al. 2023) trains its adapter against the NF4-dequantised base, so the merge
adds the update to dequant(NF4(W)), not to W (see :mod:`tensorstore_llm.lora.nf4`). NF4 works on
64-element blocks of the flattened tensor, each scaled by its absmax, and double quantisation
stores the absmaxes as 8-bit codes around their mean: a value of the whole tensor. So a merge job
first runs one statistics pass (``_absmax_map`` / ``_absmax_reduce``: the absmax of every 64-block,
a partial block at a row-block edge being the max of its parts, so exact under any blocking),
reduces it to the dequantised absmax per block exactly as :func:`~tensorstore_llm.lora.nf4.quantize_nf4`
and :func:`~tensorstore_llm.lora.nf4.dequantize_nf4` compute it for the whole tensor, and then
quantises and dequantises each row block against those per-block values. Every element meets the
same fp32 operations as in the in-memory path, so the result equals it bit for bit.

- ``nf4_lora_merge``: rows of dequant(NF4(W)) (rounded to the base dtype, as bitsandbytes hands it
  to the layer) + s·B·A, or DoRA's m·(Wq + s·B·A)/‖Wq + s·B·A‖ per stored row;
- with ``requantize``: a second pass takes the absmaxes of the merged weight (rounded to the output
  dtype) and the output is dequant(NF4(W')), the values a 4-bit model holds;
- ``nf4_merge_error`` (a reduction): ‖W − dequant(NF4(W))‖² and ‖s·B·A‖² (and with ``requantize``
  ‖W' − dequant(NF4(W'))‖²) per module, for the report.

Memory: the statistics hold two fp32 values per 64 elements (1/16 of a bf16 tensor's bytes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..dtypes import by_name
from .lora import dora_merge_rows, dora_norm, lora_delta
from .registry import StatsPass, op

BLOCK = 64


@dataclass(frozen=True)
class Nf4MergeParams:
    """The LoRA scale and layout, DoRA or not, whether to requantise, and the dtypes W and W' are
    stored in (the kernel sees fp32; NF4's round trip rounds to the stored dtype)."""

    scaling: float
    base_dtype: str
    out_dtype: str
    transpose: bool = False
    dora: bool = False
    requantize: bool = False

    def __post_init__(self):
        if not math.isfinite(self.scaling):
            raise ValueError(f"LoRA scaling must be a finite number, got {self.scaling!r}")


# -- per-block statistics ---------------------------------------------------------------------

def _flat_range(ctx, x: torch.Tensor) -> tuple[int, int]:
    """[e0, e1): the flat element indices of the tile ``x`` (rows ctx.start:ctx.stop)."""
    e0 = ctx.start * math.prod(ctx.shape[1:])
    return e0, e0 + x.numel()


def block_maxes(flat: torch.Tensor, e0: int) -> torch.Tensor:
    """max |x| over each 64-block that the elements ``flat`` (flat indices e0..) touch; the first
    and last entries cover only the part of their block inside ``flat``."""
    a = flat.abs()
    head = min(a.numel(), (-e0) % BLOCK)
    parts = [a[:head].max().view(1)] if head else []
    body = (a.numel() - head) // BLOCK * BLOCK
    if body:
        parts.append(a[head:head + body].view(-1, BLOCK).max(dim=1)[0])
    if head + body < a.numel():
        parts.append(a[head + body:].max().view(1))
    return torch.cat(parts)


def _absmax_map(ctx, params, w, **_):
    e0, _e1 = _flat_range(ctx, w)
    return {"first": e0 // BLOCK, "max": block_maxes(w.reshape(-1).float(), e0)}


def absmax_of(partials, numel: int) -> torch.Tensor:
    """The absmax of every 64-block (fp32) from the tiles' partial maxes; a last partial block's
    absmax is clamped to 1e-38 as ``quantize_nf4`` stores it."""
    n_blocks = -(-numel // BLOCK)
    absmax = torch.zeros(n_blocks, dtype=torch.float32)
    for p in partials:
        part = absmax[p["first"]:p["first"] + p["max"].numel()]
        torch.maximum(part, p["max"].to(part.device), out=part)
    if numel % BLOCK:
        absmax[-1] = absmax[-1].clamp(min=1e-38)
    return absmax


def block_scales(absmax: torch.Tensor) -> dict:
    """What quantising and dequantising a block needs: ``recip`` = 1 / absmax (clamped, as the
    quantiser multiplies by it), ``absmax`` (a last partial block divides by it) and ``dq``: the
    absmax after double quantisation (offset = mean, 8-bit dynamic codes in blocks of 256)."""
    from ..lora.nf4 import double_quantized_absmax

    return {"absmax": absmax, "recip": 1.0 / absmax.clamp(min=1e-38), "dq": double_quantized_absmax(absmax)}


def _absmax_reduce(params, partials, ctx):
    return {"w": block_scales(absmax_of(partials, math.prod(ctx.shape)))}


def nf4_round_trip(flat: torch.Tensor, e0: int, numel: int, scales: dict) -> torch.Tensor:
    """dequant(NF4(x)) in fp32 for the elements ``flat`` at flat indices e0.. of a tensor of
    ``numel`` elements, with that tensor's per-block ``scales`` (:func:`block_scales`): the
    values ``dequantize_nf4(quantize_nf4(x))`` gives before its final rounding."""
    from ..lora.nf4 import NF4_CODE

    code = NF4_CODE.to(flat.device)
    bounds = (code[:-1] + code[1:]) / 2
    n = flat.numel()
    full = numel - numel % BLOCK                                   # elements in whole 64-blocks
    recip, dq = scales["recip"].to(flat.device), scales["dq"].to(flat.device)
    if e0 % BLOCK == 0 and n % BLOCK == 0 and e0 + n <= full:     # whole blocks: no per-element index
        b0, b1 = e0 // BLOCK, (e0 + n) // BLOCK
        scaled = torch.clamp(flat.view(-1, BLOCK) * recip[b0:b1].view(-1, 1), -1, 1)
        q = torch.bucketize(scaled.view(-1), bounds, out_int32=True)
        return (code.index_select(0, q).view(-1, BLOCK) * dq[b0:b1].view(-1, 1)).view(-1)
    idx = torch.arange(e0, e0 + n, device=flat.device) // BLOCK
    scaled = torch.clamp(flat * recip[idx], -1, 1)
    if e0 + n > full:                                              # the last partial block divides
        k = max(0, full - e0)
        scaled[k:] = torch.clamp(flat[k:] / scales["absmax"][-1].to(flat.device), -1, 1)
    q = torch.bucketize(scaled, bounds, out_int32=True)
    return code.index_select(0, q) * dq[idx]


def _dequantized_rows(ctx, w: torch.Tensor, scales: dict, dtype: str) -> torch.Tensor:
    """Rows of dequant(NF4(W)) rounded to the stored ``dtype``, back in fp32."""
    e0, _ = _flat_range(ctx, w)
    values = nf4_round_trip(w.reshape(-1).float(), e0, math.prod(ctx.shape), scales)
    return values.to(by_name(dtype).torch).float().view(w.shape)


def _merged_rows(ctx, params, w, a, b, magnitude=None) -> torch.Tensor:
    """Rows of the merge into dequant(NF4(W)) in fp32 (not yet rounded)."""
    wq = _dequantized_rows(ctx, w, ctx.stats["w"], params.base_dtype)
    delta = lora_delta(a, b, params.scaling, transpose=params.transpose, rows=(ctx.start, ctx.stop))
    if params.dora:
        return dora_merge_rows(wq, delta, magnitude[ctx.start:ctx.stop], dora_norm(wq, delta), out_dtype=torch.float32)
    return delta.add_(wq)


def _rounded(x: torch.Tensor, dtype: str) -> torch.Tensor:
    return x.to(by_name(dtype).torch).float()


def _merged_absmax_map(ctx, params, w, a, b, magnitude=None):
    merged = _rounded(_merged_rows(ctx, params, w, a, b, magnitude), params.out_dtype)
    e0, _ = _flat_range(ctx, merged)
    return {"first": e0 // BLOCK, "max": block_maxes(merged.reshape(-1), e0)}


def _merged_absmax_reduce(params, partials, ctx):
    return {"merged": block_scales(absmax_of(partials, math.prod(ctx.shape)))}


def _passes(params) -> tuple[StatsPass, ...]:
    first = StatsPass(_absmax_map, _absmax_reduce)
    return (first, StatsPass(_merged_absmax_map, _merged_absmax_reduce)) if params.requantize else (first,)


def nf4_merge_kernel(ctx, params, w, a, b, magnitude=None):
    """Rows of dequant(NF4(W)) + s·B·A (DoRA: its row-normalised form), or with ``requantize``
    dequant(NF4(that)), in fp32; the executor rounds once to the output dtype."""
    merged = _merged_rows(ctx, params, w, a, b, magnitude)
    if not params.requantize:
        return merged
    merged = _rounded(merged, params.out_dtype)
    e0, _ = _flat_range(ctx, merged)
    return nf4_round_trip(merged.reshape(-1), e0, math.prod(ctx.shape), ctx.stats["merged"]).view(merged.shape)


@op("nf4_lora_merge", inputs=("w", "a", "b"), params=Nf4MergeParams, temps=8, passes=_passes)
def nf4_lora_merge_op(ctx, params, w, a, b):
    """Rows of a QLoRA merge (see :func:`nf4_merge_kernel`); A and B whole."""
    return nf4_merge_kernel(ctx, params, w, a, b)


@op("nf4_dora_merge", inputs=("w", "a", "b", "magnitude"), params=Nf4MergeParams, temps=9, passes=_passes)
def nf4_dora_merge_op(ctx, params, w, a, b, magnitude):
    """Rows of a QLoRA DoRA merge on an ``nn.Linear`` layout (norm per stored row)."""
    return nf4_merge_kernel(ctx, params, w, a, b, magnitude)


# -- the report: ||q||^2, ||delta||^2 (and the requantisation error) per module ----------------

def _sq(x: torch.Tensor) -> float:
    return float(x.double().square().sum())


def _error_map(ctx, params, w, a, b, magnitude=None):
    wq = _dequantized_rows(ctx, w, ctx.stats["w"], params.base_dtype)
    w16 = _rounded(w, params.base_dtype)
    delta = lora_delta(a, b, params.scaling, transpose=params.transpose, rows=(ctx.start, ctx.stop))
    return {"q_sq": _sq(w16 - wq), "delta_sq": _sq(delta)}


def _requant_error_map(ctx, params, w, a, b, magnitude=None):
    merged = _rounded(_merged_rows(ctx, params, w, a, b, magnitude), params.out_dtype)
    e0, _ = _flat_range(ctx, merged)
    again = nf4_round_trip(merged.reshape(-1), e0, math.prod(ctx.shape), ctx.stats["merged"])
    again = _rounded(again, params.out_dtype)
    return {"requant_sq": _sq(merged.reshape(-1) - again)}


def _add(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def _sums(params, partials, ctx):
    out = partials[0]
    for p in partials[1:]:
        out = _add(out, p)
    return out


def _drop_scales(params, partials, ctx):
    return {**_sums(params, partials, ctx), "w": {}, "merged": {}}   # records stay small (and JSON)


def _error_passes(params) -> tuple[StatsPass, ...]:
    first = StatsPass(_absmax_map, _absmax_reduce)
    if not params.requantize:
        return first, StatsPass(_error_map, _drop_scales, _add)
    return (first, StatsPass(_error_map, _sums, _add), StatsPass(_merged_absmax_map, _merged_absmax_reduce),
            StatsPass(_requant_error_map, _drop_scales, _add))


@op("nf4_merge_error", inputs=("w", "a", "b"), params=Nf4MergeParams, temps=6, passes=_error_passes)
def nf4_merge_error_op(ctx, params, w, a, b):
    """A reduction only (its passes); never computes output rows."""
    raise NotImplementedError("nf4_merge_error is a reduction job")


@op("nf4_dora_merge_error", inputs=("w", "a", "b", "magnitude"), params=Nf4MergeParams, temps=7,
    passes=_error_passes)
def nf4_dora_merge_error_op(ctx, params, w, a, b, magnitude):
    """A reduction only (its passes); never computes output rows."""
    raise NotImplementedError("nf4_dora_merge_error is a reduction job")


# -- DoRA on a transposed layout (Conv1D, embeddings): column norms need every row ----------------

def _whole_merged(params, w, a, b, magnitude) -> torch.Tensor:
    from ..lora.nf4 import nf4_roundtrip

    wq = nf4_roundtrip(w.to(by_name(params.base_dtype).torch)).float()
    delta = lora_delta(a, b, params.scaling, transpose=True)
    return dora_merge_rows(wq, delta, magnitude, dora_norm(wq, delta, transpose=True), transpose=True,
                           out_dtype=torch.float32)


@op("nf4_dora_merge_transposed", inputs=("w", "a", "b", "magnitude"), params=Nf4MergeParams, rowwise=False, temps=6)
def nf4_dora_merge_transposed_op(ctx, params, w, a, b, magnitude):
    """The whole tensor of a QLoRA DoRA merge whose norm runs over stored columns (optionally
    requantised); NF4 through :mod:`tensorstore_llm.lora.nf4` directly."""
    from ..lora.nf4 import nf4_roundtrip

    merged = _whole_merged(params, w, a, b, magnitude)
    if params.requantize:
        merged = nf4_roundtrip(merged.to(by_name(params.out_dtype).torch)).float()
    return merged


def _whole_error_map(ctx, params, w, a, b, magnitude):
    from ..lora.nf4 import nf4_roundtrip

    w16 = w.to(by_name(params.base_dtype).torch)
    delta = lora_delta(a, b, params.scaling, transpose=True)
    out = {"q_sq": _sq(w16.float() - nf4_roundtrip(w16).float()), "delta_sq": _sq(delta)}
    if params.requantize:
        merged = _whole_merged(params, w, a, b, magnitude).to(by_name(params.out_dtype).torch)
        out["requant_sq"] = _sq(merged.float() - nf4_roundtrip(merged).float())
    return out


@op("nf4_dora_transposed_error", inputs=("w", "a", "b", "magnitude"), params=Nf4MergeParams, rowwise=False,
    temps=7, passes=(StatsPass(_whole_error_map, _sums),))
def nf4_dora_transposed_error_op(ctx, params, w, a, b, magnitude):
    """A reduction only (one pass over the whole tensor); never computes output rows."""
    raise NotImplementedError("nf4_dora_transposed_error is a reduction job")


from . import nf4_pack  # noqa: F401  (registers the packed NF4 ops)
