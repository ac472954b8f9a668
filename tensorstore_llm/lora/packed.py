"""Dequantisation of GPTQ and AWQ packed 4-bit (or 2 / 8-bit) weights into dense tensors.

PEFT refuses to merge a LoRA into GPTQ / AWQ bases; we dequantise them to the dense weight the
adapter was trained against (returned in the nn.Linear layout, out x in) and merge into that.

GPTQ (AutoGPTQ / GPTQModel ``checkpoint_format`` "gptq"): ``qweight`` int32 (in * bits / 32, out),
packed along the input dimension, value k of a word in bits [bits*k, bits*(k+1)); ``qzeros`` int32
(groups, out * bits / 32) packed along the output dimension the same way, stored minus one (v1; the
"gptq_v2" format stores the zero itself: ``zero_offset=0``); ``scales`` (groups, out); optional
``g_idx`` (in,) giving each input row's group (act-order), default row // group_size.
W[o, i] = scales[g, o] * (q[i, o] - (z[g, o] + zero_offset)) with g = g_idx[i].

AWQ (AutoAWQ GEMM): ``qweight`` int32 (in, out * bits / 32) and ``qzeros`` int32
(groups, out * bits / 32) packed along the output dimension in the interleaved order
[0, 2, 4, 6, 1, 3, 5, 7] (value at shift k belongs to column 8j + order[k]); ``scales``
(groups, out); W[o, i] = scales[i // group_size, o] * (q[i, o] - z[i // group_size, o]).

The products (small integers times an fp16 scale) are exact in fp32, so the fp32 result is exact
and rounding it to fp16 equals an fp16 computation.
"""
from __future__ import annotations

import torch

from ..errors import FormatError, ShapeMismatch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values of int32 words, expanded along ``dim`` (value k at shift bits*k)."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    w = words.to(torch.int32)
    vals = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)          # ... x per (arithmetic shift, masked)
    if dim == 0:                                                    # rows x cols x per -> rows*per x cols
        return vals.permute(0, 2, 1).reshape(w.shape[0] * per, w.shape[1])
    return vals.reshape(w.shape[0], w.shape[1] * per)


def _check_bits(bits: int, where: str) -> None:
    if bits not in (2, 4, 8):
        raise FormatError(f"{where}: {bits}-bit packing is not supported (2, 4, 8)")


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, bits: int = 4,
                    group_size: int = 128, g_idx: torch.Tensor | None = None, zero_offset: int = 1,
                    dtype: torch.dtype = torch.float32, name: str = "weight") -> torch.Tensor:
    """Dense out x in weight of a GPTQ-packed linear layer (see the module docstring for the layout).

    Args:
        qweight, qzeros, scales, g_idx: the checkpoint tensors of one layer.
        group_size: input rows per group (-1: one group); ignored when ``g_idx`` is given.
        zero_offset: 1 for the classic "gptq" format (zeros stored minus one), 0 for "gptq_v2".
        name: the layer, for error messages.
    Returns:
        ``dtype`` tensor of shape (out, in).
    """
    _check_bits(bits, name)
    q = _unpack(qweight, bits, dim=0)                               # in x out
    z = _unpack(qzeros, bits, dim=1)                                # groups x out'
    n_in, n_out = q.shape
    if scales.shape[1] != n_out or z.shape[1] < n_out:
        raise ShapeMismatch(f"{name}: qweight unpacks to {n_in} x {n_out} but scales are {tuple(scales.shape)} "
                            f"and qzeros unpack to {tuple(z.shape)}")
    if g_idx is None:
        gs = n_in if group_size == -1 else group_size
        g_idx = torch.arange(n_in) // gs
    g_idx = g_idx.long()
    if g_idx.shape != (n_in,) or int(g_idx.max()) >= scales.shape[0]:
        raise ShapeMismatch(f"{name}: g_idx / group_size give groups up to {int(g_idx.max())}, scales have "
                            f"{scales.shape[0]} groups for {n_in} input rows")
    w = (q - (z[g_idx, :n_out] + zero_offset)).float() * scales[g_idx].float()   # in x out
    return w.T.contiguous().to(dtype)


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *, bits: int = 4,
                   group_size: int = 128, dtype: torch.dtype = torch.float32, name: str = "weight") -> torch.Tensor:
    """Dense out x in weight of an AWQ (GEMM) packed linear layer (see the module docstring).

    Returns:
        ``dtype`` tensor of shape (out, in).
    """
    _check_bits(bits, name)
    per = 32 // bits
    order = torch.tensor(AWQ_ORDER if bits == 4 else tuple(range(per)))
    inverse = torch.argsort(order)

    def unpack(t):
        v = _unpack(t, bits, dim=1)                                 # rows x out, shift order
        v = v.view(v.shape[0], -1, per)[:, :, inverse]              # column 8j + order[k] <- shift k
        return v.reshape(v.shape[0], -1)

    q, z = unpack(qweight), unpack(qzeros)                          # in x out, groups x out
    n_in, n_out = q.shape
    gs = n_in if group_size == -1 else group_size
    if scales.shape != (-(-n_in // gs), n_out) or z.shape != scales.shape:
        raise ShapeMismatch(f"{name}: qweight unpacks to {n_in} x {n_out}; with group size {gs} scales and qzeros "
                            f"must be {(-(-n_in // gs), n_out)}, got {tuple(scales.shape)} and {tuple(z.shape)}")
    g = torch.arange(n_in) // gs
    w = (q - z[g]).float() * scales[g].float()                      # in x out
    return w.T.contiguous().to(dtype)
