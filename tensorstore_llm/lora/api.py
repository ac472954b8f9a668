"""Merge a PEFT adapter into a Hugging Face safetensors checkpoint: the in-memory path.

The streamed merges (block by block within ``--max-memory``, into artifacts bound to their base)
are :func:`.jobs.lora_merge` and, for QLoRA, :func:`.qlora.qlora_merge`; this directory-to-directory
path remains for bases that are already quantised (the CLI sends them here) and as the reference
the streamed QLoRA merge is tested against. It holds one shard of the base at a time (plus the
adapter), merges with the same kernels, and writes a checkpoint directory with the same shard
layout. It reads safetensors only (pickle checkpoints are refused) and never leaves a
half-written output: files are staged next to ``out_dir`` and renamed into place.

Bases that are already quantised are dequantised first: bitsandbytes NF4 weights
(``<m>.weight`` + ``<m>.weight.quant_state.bitsandbytes__nf4`` ...), GPTQ and AWQ packed weights
(``<m>.qweight`` / ``qzeros`` / ``scales`` [/ ``g_idx``], settings from ``quantization_config`` in
``config.json``). The output is a dense checkpoint without ``quantization_config``.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from ..errors import FormatError, OutputExists, RecipeError, UnsafeFormat
from ..io.fsutil import staged_directory
from ..io.hf_dir import carried_files
from . import nf4 as N
from .merge import merge_module
from .packed import dequantize_awq, dequantize_gptq
from .peft_format import LoraAdapter, read_adapter

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def _shards(base_dir: str) -> dict[str, list[str]]:
    """shard file -> tensor names (in the order of the index / file)."""
    from safetensors import safe_open

    idx = os.path.join(base_dir, INDEX)
    if os.path.isfile(idx):
        with open(idx, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise FormatError(f"{idx}: no weight_map")
        out: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            out.setdefault(shard, []).append(name)
        return out
    if os.path.isfile(os.path.join(base_dir, SINGLE)):
        with safe_open(os.path.join(base_dir, SINGLE), "pt") as f:
            return {SINGLE: list(f.keys())}
    for name in _PICKLES:
        if os.path.exists(os.path.join(base_dir, name)):
            raise UnsafeFormat(f"{os.path.join(base_dir, name)}: pickle checkpoints are refused (loading them can run "
                               "code); convert the base to safetensors first")
    raise FormatError(f"{base_dir}: no {SINGLE} or {INDEX}")


def _shapes(base_dir: str, shards: dict[str, list[str]], qcfg: dict | None) -> dict[str, tuple[int, ...]]:
    """Dense shapes of every base tensor, from the headers (quantised weights as they will be)."""
    from safetensors import safe_open

    shapes = {}
    for shard, names in shards.items():
        with safe_open(os.path.join(base_dir, shard), "pt") as f:
            for name in names:
                shapes[name] = tuple(f.get_slice(name).get_shape())
    for name in list(shapes):
        if name.endswith(".quant_state.bitsandbytes__nf4"):
            w = name[: -len(".quant_state.bitsandbytes__nf4")]
            with safe_open(os.path.join(base_dir, _shard_of(shards, name)), "pt") as f:
                shapes[w] = tuple(json.loads(bytes(f.get_tensor(name).numpy().astype("uint8")).decode())["shape"])
        elif name.endswith(".qweight") and qcfg:
            m = name[: -len(".qweight")]
            q, s = shapes[name], shapes.get(m + ".scales")
            if s is None:
                raise FormatError(f"{base_dir}: {name} without {m}.scales")
            n_out = s[1]
            n_in = q[0] * 32 // qcfg.get("bits", 4) if qcfg.get("quant_method") == "gptq" else q[0]
            shapes[m + ".weight"] = (n_out, n_in)
    return shapes


def _shard_of(shards: dict[str, list[str]], name: str) -> str:
    return next(s for s, names in shards.items() if name in names)


def _dense(tensors: dict[str, torch.Tensor], qcfg: dict | None, where: str) -> dict[str, torch.Tensor]:
    """Replace quantised weights of one shard by dense ones; other tensors pass through."""
    out = {}
    nf4_state = ".quant_state.bitsandbytes__nf4"
    nf4_names = [k[: -len(nf4_state)] for k in tensors if k.endswith(nf4_state)]
    skip = set()
    for w in nf4_names:
        out[w] = N.dequantize_nf4(N.from_bnb_state_dict(tensors, w))
        skip |= {k for k in tensors if k.startswith(w + ".") or k == w}
    method = (qcfg or {}).get("quant_method")
    for k in [k for k in tensors if k.endswith(".qweight")]:
        m = k[: -len(".qweight")]
        if method not in ("gptq", "awq"):
            raise FormatError(f"{where}: {k} is packed but config.json has no GPTQ / AWQ quantization_config")
        parts = {p: tensors.get(f"{m}.{p}") for p in ("qweight", "qzeros", "scales", "g_idx")}
        if parts["qzeros"] is None or parts["scales"] is None:
            raise FormatError(f"{where}: {m} needs qweight, qzeros and scales")
        bits, gs = int(qcfg.get("bits", 4)), int(qcfg.get("group_size", 128))
        if method == "gptq":
            zero = 0 if qcfg.get("checkpoint_format") == "gptq_v2" else 1
            gidx = parts["g_idx"] if qcfg.get("desc_act") else None
            out[m + ".weight"] = dequantize_gptq(parts["qweight"], parts["qzeros"], parts["scales"], bits=bits,
                                                 group_size=gs, g_idx=gidx, zero_offset=zero,
                                                 dtype=parts["scales"].dtype, name=m)
        else:
            out[m + ".weight"] = dequantize_awq(parts["qweight"], parts["qzeros"], parts["scales"], bits=bits,
                                                group_size=gs, dtype=parts["scales"].dtype, name=m)
        skip |= {f"{m}.{p}" for p in parts}
    out.update({k: v for k, v in tensors.items() if k not in skip})
    return out


def merge_adapter(base_dir: str, adapter_dir: str, out_dir: str, *, scale: float = 1.0, base_quant: str | None = None,
                  peft_compat: bool = False, overwrite: bool = False, requantize: str | None = None) -> dict:
    """Merge the PEFT adapter in ``adapter_dir`` into the checkpoint in ``base_dir``; write ``out_dir``.

    In-memory path (one base shard at a time; streamed: ``lora.qlora.qlora_merge``). The merge is
    W + s B A (DoRA: m (W + s B A) / ||W + s B A||) in fp32 with one rounding to the base dtype,
    equal to PEFT's ``merge_and_unload()`` for fp32 weights (``peft_compat`` for PEFT's double
    rounding of half-precision adapters).

    Args:
        base_dir: Hugging Face checkpoint directory (safetensors, sharded or not; may be NF4 /
            GPTQ / AWQ quantised, then dequantised).
        adapter_dir: PEFT LoRA / DoRA adapter directory.
        out_dir: new directory (OutputExists unless ``overwrite``).
        scale: factor on every LoRA update.
        requantize: "nf4": write every merged weight NF4-round-tripped, dequant(NF4(W')), the
            values a 4-bit model holds, and report ``requant_error`` = ||W' - dequant(NF4(W'))|| /
            ||delta|| per module (the error requantising adds, next to the adapter's update).
        base_quant: "nf4" for a QLoRA adapter: merge into dequant(NF4(W)), the weights it was
            trained against, and report ||q|| / ||delta|| per module (q = W - dequant(NF4(W))).
    Returns:
        report: ``modules`` (module -> rank, scaling, and ``q_over_delta`` with nf4), ``changed``
        tensor names, ``dequantized`` tensor names.
    Raises:
        RecipeError for prefix-tuning adapters; TensorNotFound / ShapeMismatch when the adapter
        does not fit the base; UnsafeFormat for pickle files. Nothing is written then.

    Example: ``merge_adapter("llama-3-8b", "my-lora", "llama-3-8b-merged")``.
    """
    from safetensors.torch import load_file, save_file

    if base_quant not in (None, "nf4"):
        raise RecipeError(f"base_quant must be None or 'nf4', got {base_quant!r}")
    if requantize == "nf4-packed":
        raise RecipeError(f"{base_dir}: packed NF4 output (requantize 'nf4-packed') is written by the streamed merge "
                          "(lora.qlora.qlora_merge) from a dense base; this in-memory path writes 'nf4' (dense) only")
    if requantize not in (None, "nf4"):
        raise RecipeError(f"requantize must be None or 'nf4', got {requantize!r}")
    if os.path.exists(out_dir) and not overwrite:
        raise OutputExists(f"{out_dir} already exists")
    adapter = read_adapter(adapter_dir)
    if not isinstance(adapter, LoraAdapter):
        raise RecipeError(f"{adapter_dir}: a prefix-tuning adapter adds key/value prefixes to attention and cannot be "
                          "merged into weights; load it with PEFT at inference instead")
    config_path = os.path.join(base_dir, "config.json")
    config = json.load(open(config_path, encoding="utf-8")) if os.path.isfile(config_path) else None
    qcfg = (config or {}).get("quantization_config")
    shards = _shards(base_dir)
    adapter.validate_base(_shapes(base_dir, shards, qcfg), where=base_dir)

    by_weight = {m.weight_name: m for m in adapter.modules.values()}
    report = {"modules": {}, "changed": [], "dequantized": []}
    with staged_directory(out_dir, prefix=".merge-") as stage:
        weight_map = {}
        for shard in shards:
            raw = load_file(os.path.join(base_dir, shard))
            tensors = _dense(raw, qcfg, os.path.join(base_dir, shard))
            dequantized = {k for k in tensors if k not in raw or raw[k].dtype != tensors[k].dtype
                           or raw[k].shape != tensors[k].shape}
            report["dequantized"] += sorted(dequantized)
            for name in list(tensors):
                m = by_weight.get(name)
                if m is not None:
                    w = adapter.base_layers.get(name, tensors[name])
                    info = {"rank": m.r, "scaling": m.scaling * scale}
                    if base_quant == "nf4" and name not in dequantized:   # already-quantised bases are dequantised
                        w16 = w
                        w = N.nf4_roundtrip(w16)
                        info["q_over_delta"] = N.quantization_error_ratio(
                            w16, m.scaling * scale * (m.B.float() @ m.A.float()))
                    tensors[name] = merge_module(w, m, scale=scale, peft_compat=peft_compat,
                                                 out_dtype=tensors[name].dtype)
                    if requantize == "nf4":
                        merged = tensors[name]
                        tensors[name] = N.nf4_roundtrip(merged)
                        delta = m.scaling * scale * (m.B.float() @ m.A.float())
                        info["requant_error"] = float((merged.float() - tensors[name].float()).norm() / delta.norm())
                    report["modules"][m.module] = info
                    report["changed"].append(name)
                elif name in adapter.saved_modules:
                    tensors[name] = adapter.saved_modules[name].to(tensors[name].dtype)
                    report["changed"].append(name)
                if name.endswith(".bias") and name[: -len(".bias")] in adapter.modules:
                    mm = adapter.modules[name[: -len(".bias")]]
                    if mm.bias is not None:
                        biased = tensors[name].float() + mm.bias.float() * (mm.scaling * scale)
                        tensors[name] = biased.to(tensors[name].dtype)
                        report["changed"].append(name)
            save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(stage, shard),
                      metadata={"format": "pt"})
            weight_map.update({k: shard for k in tensors})
            del raw, tensors
        if os.path.isfile(os.path.join(base_dir, INDEX)):
            with open(os.path.join(stage, INDEX), "w", encoding="utf-8") as f:
                json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        for name, src in carried_files(base_dir).items():
            shutil.copy2(src, os.path.join(stage, name))
        if config is not None and qcfg is not None and report["dequantized"]:
            config = {k: v for k, v in config.items() if k != "quantization_config"}
            with open(os.path.join(stage, "config.json"), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
    return report


# ---------------------------------------------------------------- directory-level transforms

def _load_dir(path: str, qcfg_from: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory (dense; quantised weights dequantised)."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, "config.json")
    qcfg = json.load(open(cfg_path, encoding="utf-8")).get("quantization_config") if os.path.isfile(cfg_path) else None
    out: dict[str, torch.Tensor] = {}
    for shard in _shards(path):
        out.update(_dense(load_file(os.path.join(path, shard)), qcfg, os.path.join(path, shard)))
    return out


def extract_adapter_dir(base_dir: str, finetuned_dir: str, out_dir: str, *, rank: int | None = None,
                        energy: float | None = None, targets: list[str] | None = None, seed: int = 0,
                        max_rank: int | None = None) -> dict:
    """Extract a PEFT LoRA adapter from a full fine-tune (in memory; see ``adapters.extract_adapter``).

    Returns the report: ``modules`` (rank, captured energy per module) and ``totals["captured"]``.
    Example: ``extract_adapter_dir("base", "ft", "ft-lora", rank=64)``.
    """
    from .adapters import extract_adapter
    from .peft_format import write_adapter

    if os.path.exists(out_dir):
        raise OutputExists(f"{out_dir} already exists")
    adapter, report = extract_adapter(_load_dir(base_dir), _load_dir(finetuned_dir), rank=rank, energy=energy,
                                      targets=targets, seed=seed, max_rank=max_rank)
    adapter.config.base_model_name_or_path = os.path.abspath(base_dir)
    write_adapter(adapter, out_dir)
    return {"modules": report.modules, "totals": report.totals}


def resize_adapter_dir(adapter_dir: str, out_dir: str, *, rank: int | None = None, energy: float | None = None,
                       auto_budget: bool = False) -> dict:
    """Resize a PEFT adapter (``adapters.resize_adapter``) and write it; returns the report."""
    from .adapters import resize_adapter
    from .peft_format import write_adapter

    if os.path.exists(out_dir):
        raise OutputExists(f"{out_dir} already exists")
    adapter = read_adapter(adapter_dir)
    if not isinstance(adapter, LoraAdapter):
        raise RecipeError(f"{adapter_dir}: only LoRA adapters can be resized")
    new, report = resize_adapter(adapter, rank=rank, energy=energy, auto_budget=auto_budget)
    write_adapter(new, out_dir)
    return {"modules": report.modules, "totals": report.totals}


def svd_init_dirs(base_dir: str, out_base_dir: str, out_adapter_dir: str, *, rank: int, method: str = "pissa",
                  n_experts: int = 1, targets: list[str] | None = None, alpha: float | None = None,
                  residual_dtype: torch.dtype = torch.float32) -> list[str]:
    """PiSSA / GOAT initialisation for users who train next: writes the residual base (a checkpoint
    directory with the base's other files, targets replaced by W0 - s B A in ``residual_dtype``)
    and the adapter(s) (``out_adapter_dir``, or ``out_adapter_dir/expert-<e>`` for GOAT).

    Base residual + adapter(s) reproduce W0 to fp32 rounding (with the default fp32 residual).
    Returns the adapter directories written.
    """
    from safetensors.torch import save_file

    from .adapters import svd_init
    from .peft_format import write_adapter

    for d in (out_base_dir, out_adapter_dir):
        if os.path.exists(d):
            raise OutputExists(f"{d} already exists")
    base = _load_dir(base_dir)
    adapters, residual = svd_init(base, rank=rank, targets=targets, method=method, n_experts=n_experts, alpha=alpha)
    try:
        with staged_directory(out_base_dir, prefix=".svd-init-") as stage:
            tensors = {k: (residual[k].to(residual_dtype) if k in residual else v).contiguous()
                       for k, v in base.items()}
            save_file(tensors, os.path.join(stage, SINGLE), metadata={"format": "pt"})
            for name, src in carried_files(base_dir).items():
                shutil.copy2(src, os.path.join(stage, name))
            dirs = [out_adapter_dir] if len(adapters) == 1 else [os.path.join(out_adapter_dir, f"expert-{e}")
                                                                  for e in range(len(adapters))]
            for ad, d in zip(adapters, dirs):
                ad.config.base_model_name_or_path = os.path.abspath(out_base_dir)
                write_adapter(ad, d)
    except BaseException:
        shutil.rmtree(out_adapter_dir, ignore_errors=True)
        raise
    return dirs


def _read_lora(adapter_dir: str, what: str) -> LoraAdapter:
    adapter = read_adapter(adapter_dir)
    if not isinstance(adapter, LoraAdapter):
        raise RecipeError(f"{adapter_dir}: only LoRA adapters can be {what}")
    return adapter


def combine_adapter_dirs(adapter_dirs: list[str], weights: list[float], out_dir: str, *, rank: int | None = None,
                         energy: float | None = None) -> dict:
    """Linear combination of PEFT adapters on full deltas (``adapters.combine_adapters``), written as
    a new adapter: exact at rank sum(r_i), or re-factored to ``rank`` / ``energy`` with the
    Eckart-Young error per module in the report.

    Example: ``combine_adapter_dirs(["math-lora", "code-lora"], [0.5, 0.5], "both", rank=32)``.
    """
    from .adapters import combine_adapters
    from .peft_format import write_adapter

    if os.path.exists(out_dir):
        raise OutputExists(f"{out_dir} already exists")
    new, report = combine_adapters([_read_lora(d, "combined") for d in adapter_dirs], weights, rank=rank, energy=energy)
    write_adapter(new, out_dir)
    return {"modules": report.modules, "totals": report.totals}


def drop_adapter_dir(adapter_dir: str, out_dir: str, *, lowest: int | None = None, modules: list[str] = ()) -> dict:
    """AdapterDrop (``adapters.drop_layers``): write the adapter without its lowest ``lowest``
    layers and / or the named modules; the report gives ``params_removed``."""
    from .adapters import drop_layers
    from .peft_format import write_adapter

    if os.path.exists(out_dir):
        raise OutputExists(f"{out_dir} already exists")
    new, report = drop_layers(_read_lora(adapter_dir, "dropped from"), lowest=lowest, modules=modules)
    write_adapter(new, out_dir)
    return {"modules": report.modules, "totals": report.totals}
