"""Packed NF4 output of a QLoRA merge: the 4-bit codes bitsandbytes stores, streamed by rows.

``--requantize nf4-packed`` writes every Linear weight as transformers + bitsandbytes save a
``load_in_4bit`` model (see :func:`tensorstore_llm.lora.nf4.to_bnb_state_dict`) instead of dense
values. A merged weight W' = dequant(NF4(W)) + s·B·A (DoRA: its row-normalised form, see
:mod:`.nf4_merge`) is rounded to the output dtype and quantised to NF4 against its own 64-block
absmaxes, which a statistics pass takes first (double quantisation needs them all: offset =
their mean, 8-bit codes in blocks of 256). Each row of W' holds whole 64-blocks (in_features is a
multiple of 64, checked when planning), so a row block's codes are its own rows':

- main output ``<name>``: (rows, in / 2) uint8, two 4-bit codes per byte, the first in the high
  nibble (bitsandbytes' (rows * in / 2, 1) tensor, reshaped by the sink that writes it);
- extra output ``<name>.absmax``: (rows, in / 64) uint8, the double-quantised absmax codes.

The kernels see the output's shape (rows, in / 2); :func:`_weight_ctx` gives the NF4 helpers of
:mod:`.nf4_merge` the weight's (rows, in). ``nf4_pack`` quantises a Linear weight the adapter does
not touch. The reductions ``nf4_pack_state`` / ``nf4_pack_merge_error`` return what the state's
small tensors need (``offset``, ``nested_absmax``), the latter with the report's squared norms.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..dtypes import by_name
from .lora import dora_merge_rows, dora_norm, lora_delta
from .nf4_merge import (
    BLOCK,
    Nf4MergeParams,
    _absmax_map,
    _absmax_reduce,
    _add,
    _dequantized_rows,
    _merged_rows,
    _sq,
    _sums,
    absmax_of,
    block_maxes,
    nf4_round_trip,
)
from .registry import StatsPass, op

__all__ = ["Nf4PackParams", "pack_scales"]


@dataclass(frozen=True)
class Nf4PackParams:
    """The dtype a Linear weight the adapter does not touch is stored in (its NF4 input)."""

    out_dtype: str


def _weight_ctx(ctx):
    """``ctx`` with the weight's shape (rows, in) instead of the packed output's (rows, in / 2)."""
    return dataclasses.replace(ctx, shape=(ctx.shape[0], ctx.shape[1] * 2))


def pack_scales(absmax: torch.Tensor) -> dict:
    """What packing a weight with these 64-block absmaxes needs: ``recip`` (1 / absmax, as the
    quantiser multiplies), the double quantisation (``q8`` codes, ``absmax2``, ``offset``) and
    ``dq``, the absmax dequantisation multiplies by."""
    from ..lora.nf4 import _scale_blocks, double_quantize, dynamic_map

    q8, absmax2, offset = double_quantize(absmax)
    dq = _scale_blocks(dynamic_map()[q8.long()], absmax2, 256) + offset
    return {"absmax": absmax, "recip": 1.0 / absmax.clamp(min=1e-38), "dq": dq, "q8": q8, "absmax2": absmax2,
            "offset": offset}


def _rounded(x: torch.Tensor, dtype: str) -> torch.Tensor:
    return x.to(by_name(dtype).torch).float()


def _maxes(ctx, x: torch.Tensor) -> dict:
    e0 = ctx.start * x.shape[1]
    return {"first": e0 // BLOCK, "max": block_maxes(x.reshape(-1), e0)}


def _merged_max_map(ctx, params, w, a, b, magnitude=None):
    wctx = _weight_ctx(ctx)
    return _maxes(wctx, _rounded(_merged_rows(wctx, params, w, a, b, magnitude), params.out_dtype))


def _plain_max_map(ctx, params, w):
    return _maxes(ctx, _rounded(w, params.out_dtype))


def _pack_reduce(params, partials, ctx):
    shape = _weight_ctx(ctx).shape
    return {"merged": pack_scales(absmax_of(partials, math.prod(shape)))}


def pack_rows(x: torch.Tensor, start: int, scales: dict) -> dict[str, torch.Tensor]:
    """NF4 codes of rows ``start``.. of a weight (``x``: (rows, in) fp32, in a multiple of 64):
    ``packed`` (rows, in / 2) uint8 and ``absmax`` (rows, in / 64) uint8 codes, with the whole
    weight's ``scales`` (:func:`pack_scales`)."""
    from ..lora.nf4 import NF4_CODE

    rows, n_in = x.shape
    b0, b1 = start * n_in // BLOCK, (start + rows) * n_in // BLOCK
    code = NF4_CODE.to(x.device)
    scaled = torch.clamp(x.reshape(-1, BLOCK) * scales["recip"][b0:b1].to(x.device).view(-1, 1), -1, 1)
    q = torch.bucketize(scaled.reshape(-1), (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]                              # high nibble first, as bitsandbytes
    return {"packed": packed.view(rows, n_in // 2), "absmax": scales["q8"][b0:b1].to(x.device).view(rows, n_in // BLOCK)}


def _outputs(ctx, packed: dict) -> dict:
    return {ctx.output: packed["packed"], ctx.output + ".absmax": packed["absmax"]}


def _merge_passes(params):
    return StatsPass(_absmax_map_w, _absmax_reduce_w), StatsPass(_merged_max_map, _pack_reduce)


def _absmax_map_w(ctx, params, w, **_):
    return _absmax_map(_weight_ctx(ctx), params, w)


def _absmax_reduce_w(params, partials, ctx):
    return _absmax_reduce(params, partials, _weight_ctx(ctx))


def nf4_pack_merge_kernel(ctx, params, w, a, b, magnitude=None):
    """Packed NF4 codes of rows of the QLoRA merge (rounded to ``params.out_dtype``)."""
    wctx = _weight_ctx(ctx)
    merged = _rounded(_merged_rows(wctx, params, w, a, b, magnitude), params.out_dtype)
    return _outputs(ctx, pack_rows(merged, ctx.start, ctx.stats["merged"]))


@op("nf4_pack_merge", inputs=("w", "a", "b"), params=Nf4MergeParams, temps=8, passes=_merge_passes)
def nf4_pack_merge_op(ctx, params, w, a, b):
    """Rows of a QLoRA merge as packed NF4 (main output) and absmax codes (extra output)."""
    return nf4_pack_merge_kernel(ctx, params, w, a, b)


@op("nf4_pack_dora_merge", inputs=("w", "a", "b", "magnitude"), params=Nf4MergeParams, temps=9,
    passes=_merge_passes)
def nf4_pack_dora_merge_op(ctx, params, w, a, b, magnitude):
    """Rows of a QLoRA DoRA merge (``nn.Linear`` layout) as packed NF4 and absmax codes."""
    return nf4_pack_merge_kernel(ctx, params, w, a, b, magnitude)


@op("nf4_pack", inputs=("w",), params=Nf4PackParams, temps=4,
    passes=(StatsPass(_plain_max_map, _pack_reduce),))
def nf4_pack_op(ctx, params, w):
    """Rows of a Linear weight the adapter does not touch, as packed NF4 and absmax codes."""
    return _outputs(ctx, pack_rows(_rounded(w, params.out_dtype), ctx.start, ctx.stats["merged"]))


# -- reductions: the state's small tensors (and the report's norms) ---------------------------

def _state(stats: dict) -> dict:
    return {"offset": float(stats["offset"]), "nested_absmax": stats["absmax2"].tolist()}


def _plain_state_reduce(params, partials, ctx):
    return _state(_pack_reduce(params, partials, ctx)["merged"])


@op("nf4_pack_state", inputs=("w",), params=Nf4PackParams, temps=3,
    passes=(StatsPass(_plain_max_map, _plain_state_reduce),))
def nf4_pack_state_op(ctx, params, w):
    """A reduction only: ``offset`` and ``nested_absmax`` of a weight packed as it is."""
    raise NotImplementedError("nf4_pack_state is a reduction job")


def _errors_map(ctx, params, w, a, b, magnitude=None):
    """‖W − dequant(NF4(W))‖², ‖Δ‖² and ‖W' − dequant(NF4(W'))‖² of a row tile, W' computed once."""
    wctx = _weight_ctx(ctx)
    wq = _dequantized_rows(wctx, w, ctx.stats["w"], params.base_dtype)
    delta = lora_delta(a, b, params.scaling, transpose=params.transpose, rows=(ctx.start, ctx.stop))
    out = {"q_sq": _sq(_rounded(w, params.base_dtype) - wq), "delta_sq": _sq(delta)}
    if params.dora:
        merged = dora_merge_rows(wq, delta, magnitude[ctx.start:ctx.stop], dora_norm(wq, delta), out_dtype=torch.float32)
    else:
        merged = delta.add_(wq)
    merged = _rounded(merged, params.out_dtype).reshape(-1)
    again = nf4_round_trip(merged, ctx.start * w.shape[1], math.prod(wctx.shape), ctx.stats["merged"])
    return {**out, "requant_sq": _sq(merged - _rounded(again, params.out_dtype))}


def _final_reduce(params, partials, ctx):
    return {**_sums(params, partials, ctx), **_state(ctx.stats["merged"]), "w": {}, "merged": {}}


def _error_passes(params):
    return (StatsPass(_absmax_map_w, _absmax_reduce_w), StatsPass(_merged_max_map, _pack_reduce),
            StatsPass(_errors_map, _final_reduce, _add))


@op("nf4_pack_merge_error", inputs=("w", "a", "b"), params=Nf4MergeParams, temps=6, passes=_error_passes)
def nf4_pack_merge_error_op(ctx, params, w, a, b):
    """A reduction only: ‖q‖², ‖Δ‖², ‖W' − dequant(NF4(W'))‖², ``offset`` and ``nested_absmax``."""
    raise NotImplementedError("nf4_pack_merge_error is a reduction job")


@op("nf4_pack_dora_merge_error", inputs=("w", "a", "b", "magnitude"), params=Nf4MergeParams, temps=7,
    passes=_error_passes)
def nf4_pack_dora_merge_error_op(ctx, params, w, a, b, magnitude):
    """A reduction only, for a DoRA module (see :func:`nf4_pack_merge_error_op`)."""
    raise NotImplementedError("nf4_pack_dora_merge_error is a reduction job")
