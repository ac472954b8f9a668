"""Reading, writing and building PEFT adapters (the classes are in :mod:`.peft_format`).

``read_adapter`` parses ``adapter_config.json`` + ``adapter_model.safetensors`` (refusing pickled
weights), ``write_adapter`` stages a directory PEFT loads (``write_adapter_streamed`` the same
from a TensorSource, one tensor in memory at a time), ``build_adapter`` makes an adapter from
factors.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import torch

from ..dtypes import by_name, raw_bytes
from ..errors import FormatError, OutputExists, UnsafeFormat
from ..io.base import TensorSource
from ..io.fsutil import staged_directory
from .peft_format import (
    CONFIG_FILE,
    PICKLE_FILES,
    WEIGHTS_FILE,
    LoraAdapter,
    LoraConfig,
    ModuleLora,
    PrefixAdapter,
    peft_key,
    split_peft_key,
)


def _fail_pickle(path: str) -> None:
    for name in PICKLE_FILES:
        if os.path.isfile(os.path.join(path, name)):
            raise UnsafeFormat(f"{os.path.join(path, name)}: pickled adapter weights are refused (loading pickle can "
                               f"run code); convert it to {WEIGHTS_FILE} with a trusted tool first")
    raise FormatError(f"{path}: no {WEIGHTS_FILE}")


def read_adapter(path: str) -> LoraAdapter | PrefixAdapter:
    """Read a PEFT adapter directory (LoRA, DoRA or prefix tuning).

    Args:
        path: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
    Returns:
        :class:`LoraAdapter` or :class:`PrefixAdapter`, tensors in their stored dtype.
    Raises:
        UnsafeFormat for pickled weights; FormatError (naming file and key) for a missing or
        malformed config, an unsupported ``peft_type``, rank 0, a rank above min(out, in),
        factors that disagree with the configured rank, or missing / stray tensors.

    Example: ``adapter = read_adapter("my-lora"); adapter.ranks()``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FormatError(f"{path}: not a PEFT adapter (no {CONFIG_FILE})")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(f"{cfg_path}: unreadable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise FormatError(f"{cfg_path}: expected a JSON object")
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        _fail_pickle(path)
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{weights}: not a readable safetensors file ({e})") from None
    kind = raw.get("peft_type")
    if kind == "PREFIX_TUNING":                        # P-Tuning v2 is PEFT's prefix tuning
        if set(tensors) != {"prompt_embeddings"}:
            raise FormatError(f"{weights}: prefix tuning expects one tensor 'prompt_embeddings', got {sorted(tensors)}")
        return PrefixAdapter(config=raw, prompt_embeddings=tensors["prompt_embeddings"], source=path)
    if kind != "LORA":
        raise FormatError(f"{cfg_path}: peft_type {kind!r} is not supported (LORA, PREFIX_TUNING)")
    return _parse_lora(LoraConfig.from_dict(raw, where=cfg_path), tensors, weights, path)


def _parse_lora(cfg: LoraConfig, tensors: dict, weights: str, path: str) -> LoraAdapter:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    saved, base_layers = {}, {}
    for key, t in tensors.items():
        module, part = split_peft_key(key)
        if part is None:
            saved[module] = t
        elif part == "base_layer":
            base_layers[module + ".weight"] = t
        else:
            parts.setdefault(module, {})[part] = t
    modules = {}
    for module, p in parts.items():
        emb = "A_emb" in p or "B_emb" in p
        a, b = ("A_emb", "B_emb") if emb else ("A", "B")
        for need in (a, b):
            if need not in p:
                raise FormatError(f"{weights}: {peft_key(module, need)} is missing (its module has {sorted(p)})")
        A, B = p[a], p[b]
        r = cfg.rank_for(module)
        if A.ndim != 2 or B.ndim != 2:
            raise FormatError(f"{weights}: {peft_key(module, a)} must be 2-D (Conv LoRA is not supported), "
                              f"got {tuple(A.shape)}")
        if A.shape[0] != r or B.shape[1] != r:
            raise FormatError(f"{weights}: {peft_key(module, a)} {tuple(A.shape)} and {peft_key(module, b)} "
                              f"{tuple(B.shape)} do not have the configured rank r={r} for {module!r}")
        if r > min(A.shape[1], B.shape[0]):
            raise FormatError(f"{weights}: rank {r} of {module!r} exceeds min(out, in) = "
                              f"{min(A.shape[1], B.shape[0])}")
        mag = p.get("magnitude")
        if cfg.use_dora and mag is None:
            raise FormatError(f"{weights}: use_dora is set but {peft_key(module, 'magnitude')} is missing")
        if mag is not None and tuple(mag.shape) != (B.shape[0],):
            raise FormatError(f"{weights}: {peft_key(module, 'magnitude')} has shape {tuple(mag.shape)}, "
                              f"expected ({B.shape[0]},)")
        bias = p.get("bias")
        if bias is not None and tuple(bias.shape) != (B.shape[0],):
            raise FormatError(f"{weights}: {peft_key(module, 'bias')} has shape {tuple(bias.shape)}, "
                              f"expected ({B.shape[0]},)")
        modules[module] = ModuleLora(module=module, kind="embedding" if emb else "linear", A=A, B=B,
                                     scaling=cfg.scaling_for(module), alpha=cfg.alpha_for(module),
                                     fan_in_fan_out=cfg.fan_in_fan_out and not emb, magnitude=mag, bias=bias)
    return LoraAdapter(config=cfg, modules=modules, saved_modules=saved, base_layers=base_layers, source=path)


def write_adapter(adapter: LoraAdapter | PrefixAdapter, path: str, *, overwrite: bool = False) -> str:
    """Write ``adapter`` as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

    The files are staged in a temporary directory next to ``path`` and renamed into place, so a
    failure leaves nothing half-written. Raises OutputExists if ``path`` exists and not
    ``overwrite``. Returns ``path``.
    """
    from safetensors.torch import save_file

    if os.path.exists(path) and not overwrite:
        raise OutputExists(f"{path} already exists")
    with staged_directory(path, prefix=".adapter-") as stage:
        cfg = adapter.config.to_dict() if isinstance(adapter, LoraAdapter) else dict(adapter.config)
        with open(os.path.join(stage, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        save_file(adapter.state_dict(), os.path.join(stage, WEIGHTS_FILE), metadata={"format": "pt"})
    return path


# safetensors' order of tensors in a file: by its Dtype enum, highest first, then by name. Written
# in this order (with its header layout, io.safetensors_format.build_header) the file's bytes are
# those of safetensors.torch.save_file (tests/test_lora_artifacts.py checks it).
_SAFETENSORS_DTYPE_RANK = {code: i for i, code in enumerate(
    ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16",
     "I32", "U32", "F32", "F64", "I64", "U64"))}


def write_adapter_streamed(config: dict, source: TensorSource, path: str, *, where: str,
                           overwrite: bool = False) -> str:
    """:func:`write_adapter` of the adapter whose ``adapter_config.json`` is ``config`` and whose
    tensors ``source`` holds under their PEFT keys (a ``lora`` artifact), holding one tensor in
    memory at a time instead of the whole adapter: the same two files, byte for byte.

    The adapter is checked as :func:`read_adapter` checks one (FormatError naming ``where`` and
    the key), from the tensors' shapes alone, before anything is written; the files are staged
    and renamed into place. Returns ``path``.

    Example: ``with store.open(ref) as src: write_adapter_streamed(cfg, src, "out", where=ref)``.
    """
    from ..io.safetensors_format import build_header

    if os.path.exists(path) and not overwrite:
        raise OutputExists(f"{path} already exists")
    metas = {m.name: m for m in source.metas()}
    # the adapter's structure from empty "meta" tensors of the stored shapes: no data is read
    shells = {n: torch.empty(m.shape, dtype=by_name(m.dtype).torch, device="meta") for n, m in metas.items()}
    if config.get("peft_type") == "PREFIX_TUNING":
        if "prompt_embeddings" not in shells:
            raise FormatError(f"{where}: prefix tuning expects one tensor 'prompt_embeddings', got {sorted(shells)}")
        shell: LoraAdapter | PrefixAdapter = PrefixAdapter(config=config, prompt_embeddings=shells["prompt_embeddings"],
                                                           source=where)
    else:
        shell = _parse_lora(LoraConfig.from_dict(config, where=where), shells, where, where)
    names = list(shell.state_dict())
    if set(names) != set(metas):   # stored names that are not PEFT's own spelling: rebuild in memory
        tensors = {n: source.read(n) for n in metas}
        if isinstance(shell, PrefixAdapter):
            return write_adapter(PrefixAdapter(config=config, prompt_embeddings=tensors["prompt_embeddings"],
                                               source=where), path, overwrite=overwrite)
        return write_adapter(_parse_lora(shell.config, tensors, where, where), path, overwrite=overwrite)
    order = sorted(names, key=lambda n: (-_SAFETENSORS_DTYPE_RANK[by_name(metas[n].dtype).safetensors], n))
    header, _ = build_header([metas[n] for n in order], {"format": "pt"})
    with staged_directory(path, prefix=".adapter-") as stage:
        cfg = shell.config.to_dict() if isinstance(shell, LoraAdapter) else dict(shell.config)
        with open(os.path.join(stage, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        with open(os.path.join(stage, WEIGHTS_FILE), "wb") as f:
            f.write(header)
            for name in order:
                f.write(raw_bytes(source.read(name)))
    return path


def build_adapter(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, alpha: float | None = None,
                  kinds: Mapping[str, str] | None = None, fan_in_fan_out: bool = False,
                  base_model_name_or_path: str | None = None, dtype: torch.dtype = torch.float32,
                  fold_scaling: bool = True) -> LoraAdapter:
    """A LoRA adapter whose update for each module is exactly B @ A of the given factors.

    Args:
        factors: module -> (A: r x in, B: out x r) with the scale already folded in.
        alpha: lora_alpha (default: the most common rank, so s = 1 there). Modules with another
            rank get a ``rank_pattern`` entry; B is divided by each module's s = alpha / r.
        kinds: module -> "embedding" for embedding LoRA (default "linear").
        fold_scaling: False stores B as given (the update is then s * B @ A).
    Returns:
        :class:`LoraAdapter` ready for :func:`write_adapter`.
    """
    if not factors:
        raise ValueError("no modules")
    ranks = {k: a.shape[0] for k, (a, _) in factors.items()}
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r0 = max(sorted(counts), key=lambda r: counts[r])
    alpha = float(r0 if alpha is None else alpha)
    pattern = {re.escape(k): r for k, r in ranks.items() if r != r0}
    cfg = LoraConfig(r=r0, lora_alpha=alpha, target_modules=sorted(factors), rank_pattern=pattern,
                     fan_in_fan_out=fan_in_fan_out, base_model_name_or_path=base_model_name_or_path)
    modules = {}
    for k, (A, B) in factors.items():
        s = cfg.scaling_for(k)
        kind = (kinds or {}).get(k, "linear")
        B = (B.float() / s if fold_scaling else B).to(dtype)
        modules[k] = ModuleLora(module=k, kind=kind, A=A.to(dtype).contiguous(), B=B, scaling=s, alpha=alpha,
                                fan_in_fan_out=fan_in_fan_out and kind == "linear")
    return LoraAdapter(config=cfg, modules=modules)
