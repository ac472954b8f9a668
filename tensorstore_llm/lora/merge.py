"""Merging a LoRA / DoRA adapter into base tensors (in memory, tensor by tensor).

These functions take base tensors already read and return merged tensors; the arithmetic is the
kernels of :mod:`tensorstore_llm.ops.lora` (fp32, one rounding). They are what a streamed merge
job calls per tensor (or per row block for plain LoRA and row-layout DoRA); the in-memory
:func:`merge_state_dict` is the reference path users can call today.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import RecipeError
from ..ops import lora as K
from .peft_format import LoraAdapter, ModuleLora, PrefixAdapter

_HALF = (torch.float16, torch.bfloat16)


def merge_module(weight: torch.Tensor, m: ModuleLora, *, scale: float = 1.0, peft_compat: bool = False,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The merged weight of one module: W + s B A, or DoRA's m (W + s B A) / ||W + s B A||.

    Args:
        weight: the base weight in its stored layout (see ``ModuleLora.base_shape``).
        m: the module's factors.
        scale: extra factor on the update (``--scale``), applied to s.
        peft_compat: round like PEFT's ``merge_and_unload`` on CPU where it rounds twice (a half
            precision adapter's delta is rounded to the adapter dtype; an embedding's delta to the
            base dtype) instead of the single rounding at the end. Identical for fp32 inputs.
        out_dtype: dtype of the result (default: the base weight's).
    Returns:
        the merged tensor.
    """
    norm = None
    if m.magnitude is not None and m.transpose:                      # DoRA column norms need all rows
        s = m.scaling * scale if scale != 1.0 else m.scaling
        norm = K.dora_norm(weight, K.lora_delta(m.A, m.B, s, transpose=True), transpose=True)
    return merge_module_rows(weight, m, 0, weight.shape[0], scale=scale, peft_compat=peft_compat,
                             out_dtype=out_dtype, dora_column_norm=norm)


def merge_module_rows(w_rows: torch.Tensor, m: ModuleLora, r0: int, r1: int, *, scale: float = 1.0,
                      peft_compat: bool = False, out_dtype: torch.dtype | None = None,
                      dora_column_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Rows r0:r1 of :func:`merge_module`: what a streamed merge job computes per row block.

    Plain LoRA and DoRA on ``nn.Linear`` need only the block (the factors are whole-tensor side
    inputs; DoRA's norm is per stored row). DoRA on a transposed layout (Conv1D
    ``fan_in_fan_out``, embeddings) normalises stored columns over all rows: pass
    ``dora_column_norm`` = ``ops.lora.dora_norm(W, delta, transpose=True)`` from a whole-tensor
    pass. Concatenating the blocks equals :func:`merge_module` bit for bit.
    """
    s = m.scaling * scale if scale != 1.0 else m.scaling
    delta = K.lora_delta(m.A, m.B, s, transpose=m.transpose, rows=(r0, r1))
    if m.magnitude is not None:
        if m.transpose:
            if dora_column_norm is None:
                raise RecipeError(f"{m.module}: DoRA on a transposed layout needs the whole-tensor column norm")
            return K.dora_merge_rows(w_rows, delta, m.magnitude, dora_column_norm, transpose=True, out_dtype=out_dtype)
        return K.dora_merge_rows(w_rows, delta, m.magnitude[r0:r1], K.dora_norm(w_rows, delta), out_dtype=out_dtype)
    round_to = None
    if peft_compat:
        if m.A.dtype in _HALF:
            delta = delta.to(m.A.dtype).float()
        if m.kind == "embedding":
            round_to = w_rows.dtype
    return K.merge_rows(w_rows, delta, out_dtype=out_dtype, round_delta_to=round_to)


def merged_names(adapter: LoraAdapter) -> list[str]:
    """Base tensor names a merge of ``adapter`` changes or replaces."""
    names = [m.weight_name for m in adapter.modules.values()]
    names += [m.module + ".bias" for m in adapter.modules.values() if m.bias is not None]
    return names + list(adapter.saved_modules)


def merge_state_dict(base: Mapping[str, torch.Tensor], adapter: LoraAdapter | PrefixAdapter, *,
                     scale: float = 1.0, peft_compat: bool = False) -> dict[str, torch.Tensor]:
    """Merge ``adapter`` into ``base`` (tensor name -> tensor) and return the changed tensors.

    Equals PEFT's ``merge_and_unload()`` state for fp32 bases and adapters (bit for bit), and for
    half-precision bases with ``peft_compat`` (plain LoRA). ``modules_to_save`` tensors replace
    the base's; base weights saved with the adapter (embeddings) are merged instead of the base's,
    as PEFT loads them. Raises RecipeError for a prefix-tuning adapter (nothing to merge) and
    TensorNotFound / ShapeMismatch when the adapter does not fit the base.

    >>> from tensorstore_llm.lora.peft_format import build_adapter
    >>> ad = build_adapter({"fc": (torch.ones(1, 2), torch.ones(3, 1))})
    >>> merge_state_dict({"fc.weight": torch.zeros(3, 2)}, ad)["fc.weight"].sum().item()
    6.0
    """
    if isinstance(adapter, PrefixAdapter):
        raise RecipeError(f"{adapter.source or 'adapter'}: a prefix-tuning adapter adds key/value prefixes to "
                          "attention and cannot be merged into weights; load it with PEFT at inference instead")
    adapter.validate_base({k: tuple(v.shape) for k, v in base.items()})
    out: dict[str, torch.Tensor] = {}
    for m in adapter.modules.values():
        w = adapter.base_layers.get(m.weight_name, base[m.weight_name])
        out[m.weight_name] = merge_module(w, m, scale=scale, peft_compat=peft_compat,
                                          out_dtype=base[m.weight_name].dtype)
        if m.bias is not None:
            bname = m.module + ".bias"
            if bname not in base:
                raise RecipeError(f"{adapter.source or 'adapter'}: lora_bias for {m.module!r} but the base has "
                                  f"no {bname}")
            out[bname] = K.merge_rows(base[bname][None], (m.bias.float() * (m.scaling * scale))[None])[0]
    for name, t in adapter.saved_modules.items():
        out[name] = t.to(base[name].dtype)
    return out
