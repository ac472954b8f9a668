"""Plans for streamed LoRA work: the engine does the reading, computing and writing.

``plan_lora_merge`` turns (base model, PEFT adapter) into one job per base tensor: a targeted
weight is merged by the ``lora_merge`` / ``dora_merge`` ops (W read by row blocks, the adapter's
factors whole), a ``modules_to_save`` tensor is taken from the adapter, everything else is
copied. So a merge holds a few row blocks of W plus the factors of one module, within
``--max-memory``, whatever the size of the model.
"""
from __future__ import annotations

import os

from ..engine.plan import ROWS, WHOLE, InputRef, Plan, TensorJob
from ..errors import FormatError, RecipeError
from ..io.base import TensorSource
from ..io.hf_dir import HFCheckpointSource
from ..ops.lora import LoraMergeParams
from .peft_format import WEIGHTS_FILE, LoraAdapter, PrefixAdapter, peft_key, read_adapter, split_peft_key


def open_adapter(path: str) -> tuple[LoraAdapter, TensorSource]:
    """(adapter, a TensorSource over its safetensors file) of a PEFT adapter directory.

    The adapter is parsed and checked in memory (config, ranks, factor shapes: it is small);
    the streamed jobs read its factors through the source. A prefix-tuning adapter is refused:
    it adds key / value prefixes and has nothing to merge into weights.
    """
    adapter = read_adapter(path)
    if isinstance(adapter, PrefixAdapter):
        raise RecipeError(f"{path}: a prefix-tuning adapter adds key/value prefixes to attention and cannot be "
                          "merged into weights; load it with PEFT at inference instead")
    weights = os.path.join(path, WEIGHTS_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(weights):
        raise FormatError(f"{path}: no {WEIGHTS_FILE}")
    return adapter, HFCheckpointSource(weights)


def plan_lora_merge(base: TensorSource, adapter: LoraAdapter, adapter_source: TensorSource, *,
                    scale: float = 1.0, where: str = "lora merge") -> Plan:
    """A plan writing base + adapter: every base tensor, merged where the adapter targets it.

    Args:
        base: the base model (store artifact, HF directory, ...).
        adapter, adapter_source: from :func:`open_adapter`.
        scale: extra factor on every update (``--scale``); 1 reproduces PEFT's merge.
    Raises:
        TensorNotFound / ShapeMismatch when the adapter does not fit the base (naming file and
        key), RecipeError for a non-finite scale. Nothing is read beyond the headers.
    """
    import math

    if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise RecipeError(f"{where}: --scale must be a finite number, got {scale!r}")
    metas = {m.name: m for m in base.metas()}
    adapter.validate_base({n: m.shape for n, m in metas.items()}, where=getattr(base, "path", "the base"))
    file_keys = {split_peft_key(k): k for k in adapter_source.keys()}

    def key(module: str, part: str | None, relation: str = WHOLE) -> InputRef:
        """The adapter file's own key for (module, part), whatever PEFT version wrote it."""
        found = file_keys.get((module, part))
        if found is None:
            raise FormatError(f"{getattr(adapter_source, 'path', 'adapter')}: no tensor for {peft_key(module, part)!r}")
        return InputRef("adapter", found, relation)
    by_weight = {m.weight_name: m for m in adapter.modules.values()}
    by_bias = {m.module + ".bias": m for m in adapter.modules.values() if m.bias is not None}
    jobs = []
    for name, meta in metas.items():
        w = InputRef("base", name)
        if name in adapter.base_layers:   # a base weight saved with the adapter replaces the base's
            w = key(name[: -len(".weight")], "base_layer", ROWS)
        if name in by_weight:
            m = by_weight[name]
            a_part, b_part = ("A_emb", "B_emb") if m.kind == "embedding" else ("A", "B")
            params = LoraMergeParams(scaling=m.scaling * scale, transpose=m.transpose,   # PEFT rounds an embedding's
                                     round_to=meta.dtype if m.kind == "embedding" and m.magnitude is None else None)
            inputs = [("w", w), ("a", key(m.module, a_part)), ("b", key(m.module, b_part))]
            op = "lora_merge"
            if m.magnitude is not None:
                inputs.append(("magnitude", key(m.module, "magnitude")))
                op = "dora_merge_transposed" if m.transpose else "dora_merge"
            jobs.append(TensorJob(meta, op, tuple(inputs), params))
        elif name in by_bias:
            m = by_bias[name]
            # a 1-D bias: b + s * lora_bias, the bias read by rows like a weight
            jobs.append(TensorJob(meta, "lora_bias_merge", (("w", w), ("bias", key(m.module, "bias", ROWS))),
                                  LoraMergeParams(scaling=m.scaling * scale)))
        elif name in adapter.saved_modules:
            jobs.append(TensorJob(meta, "copy", (("x", key(name, None, ROWS)),)))
        else:
            jobs.append(TensorJob(meta, "copy", (("x", w),)))
    plan = Plan(jobs, {"base": base, "adapter": adapter_source})
    plan.validate(where)
    return plan
