"""Adapters as store artifacts: a ``lora`` artifact bound to its base.

An adapter artifact holds the PEFT tensors under their PEFT key names (``base_model.model.
<module>.lora_A.weight`` ...), carries ``adapter_config.json``, and records in ``info`` (schema
``lora/1``, see store/info.py):

- ``base``: ``{"id": <base artifact id or null>, "external": <where a directory base came
  from, or null>, "checksums": {<base tensor>: "sha256:..."}}`` for every base weight the
  adapter changes (the manifest's checksum form, so a store base is checked from its manifest
  without reading a byte, a directory base by hashing those tensors);
- ``ranks`` (module -> r), ``alpha``, ``peft_type`` (LORA or PREFIX_TUNING), ``num_params``.

Prefix-tuning (P-Tuning v2) adapters are stored the same way (one ``prompt_embeddings`` tensor,
no ranks); they change no weight, so they are bound by what they depend on: the shape fields of
the base's ``config.json`` (``base.config``) and the checksums of its token embedding and
attention projections (:mod:`.prefix_binding`).
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

from ..dtypes import raw_bytes
from ..errors import BaseMismatch, FormatError, OutputExists, RecipeError
from ..io.base import SourceBase, TensorMeta, checksum_rows
from ..store.store import Artifact, Store, job_key
from .peft_format import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter, LoraConfig, PrefixAdapter, _parse_lora

KIND = "lora"


class DictSource(SourceBase):
    """A TensorSource over tensors in memory (an adapter's factors): the engine reads them like
    any other source. ``identity`` hashes the contents, so equal tensors give equal job keys."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: str = "in-memory adapter"):
        self.tensors = {k: v.contiguous() for k, v in tensors.items()}
        self.path = path
        h = hashlib.sha256()
        for k in sorted(self.tensors):
            t = self.tensors[k]
            h.update(f"{k}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
            h.update(raw_bytes(t))
        self.identity = "memory:" + h.hexdigest()

    def keys(self) -> list[str]:
        return list(self.tensors)

    def meta(self, name: str) -> TensorMeta:
        from ..dtypes import from_torch
        from ..errors import TensorNotFound

        if name not in self.tensors:
            raise TensorNotFound(f"{self.path}: no tensor {name!r}")
        t = self.tensors[name]
        return TensorMeta(name, tuple(t.shape), from_torch(t.dtype).name)

    def read_rows(self, name: str, start: int, stop: int):
        t = self.tensors[name]
        return t if t.ndim == 0 else t[start:stop]


# ---------------------------------------------------------------- binding to a base

def weight_names(adapter: LoraAdapter | PrefixAdapter) -> list[str]:
    """Base tensors an adapter changes (its binding covers exactly these)."""
    if isinstance(adapter, PrefixAdapter):
        return []
    names = [m.weight_name for m in adapter.modules.values()]
    names += [m.module + ".bias" for m in adapter.modules.values() if m.bias is not None]
    return sorted(set(names) | set(adapter.saved_modules))


def base_checksums(store: Store | None, source, lineage: dict, names: list[str]) -> dict[str, str]:
    """Checksums of ``names`` in a base: from the manifest when the base is a store artifact,
    else by hashing the tensors (read in 64 MiB blocks)."""
    if store is not None and "id" in lineage:
        recorded = store.get(lineage["id"]).manifest.checksums()
        return {n: recorded[n] for n in names}
    return {n: checksum_rows(source.meta(n), lambda a, b, n=n: source.read_rows(n, a, b), f"base tensor {n}")
            for n in names}


def binding(store: Store | None, source, lineage: dict, adapter, files: dict | None = None) -> dict:
    """``info["base"]`` of an adapter made for the base opened as (source, lineage): the
    checksums of the weights a LoRA adapter changes; for a prefix adapter, the checksums of the
    tensors it depends on and the shape fields of the base's ``config.json`` (from ``files``, see
    :mod:`.prefix_binding`)."""
    if not isinstance(adapter, PrefixAdapter):
        return {"id": lineage.get("id"), "external": lineage.get("external"),
                "checksums": base_checksums(store, source, lineage, weight_names(adapter))}
    from .prefix_binding import dependencies, read_config, shape_fields

    config = read_config(files)
    if config is None:
        raise FormatError(f"{describe_base({'id': lineage.get('id'), 'external': lineage.get('external')})}: no "
                          "config.json, so a prefix-tuning adapter cannot be bound to this base's layers and heads")
    return {"id": lineage.get("id"), "external": lineage.get("external"), "config": shape_fields(config),
            "checksums": base_checksums(store, source, lineage, dependencies(source.keys(), config))}


def check_binding(store: Store, bound: dict, source, lineage: dict, *, where: str,
                  files: dict | None = None) -> list[str]:
    """The base tensors (and, for a prefix adapter, ``config.json`` fields, read from ``files``)
    that differ from the adapter's binding; empty: its own base.

    A base with the bound artifact id matches without reading anything; an adapter bound by id
    alone (a prefix adapter stored before content binding) matches only that artifact.
    """
    if bound.get("id") is not None and lineage.get("id") == bound["id"]:
        return []
    checksums = bound.get("checksums") or {}
    differ = []
    if "config" in bound:
        from .prefix_binding import config_mismatches, read_config

        differ = config_mismatches(bound["config"], read_config(files))
    if not checksums:
        if bound.get("id") is None or "config" in bound:
            return differ
        return [f"(base artifact {bound['id'][:12]})"]
    missing = [n for n in checksums if n not in set(source.keys())]
    if missing:
        return differ + missing
    have = base_checksums(store, source, lineage, sorted(checksums))
    return differ + [n for n, c in checksums.items() if have[n] != c]


def describe_base(bound: dict) -> str:
    """One line naming an adapter's base: its artifact id or where it came from."""
    if bound.get("id"):
        return bound["id"][:12]
    ext = bound.get("external") or {}
    return ext.get("path") or ext.get("repo") or "unknown base"


def adapter_summary(info: dict) -> str:
    """One line for ``tsllm show`` / ``log``: type, ranks and parameter count of an adapter.

    >>> adapter_summary({"peft_type": "LORA", "ranks": {"a": 8, "b": 8, "c": 4}, "num_params": 1000})
    'LORA r=4..8 on 3 modules, 1,000 parameters'
    """
    ranks = sorted(set((info.get("ranks") or {}).values()))
    params = f"{info.get('num_params', 0):,} parameters"
    if not ranks:
        return f"{info.get('peft_type', '?')}, {params}"
    r = f"r={ranks[0]}" if len(ranks) == 1 else f"r={ranks[0]}..{ranks[-1]}"
    dora = " DoRA" if info.get("dora") else ""
    return f"{info.get('peft_type', 'LORA')}{dora} {r} on {len(info['ranks'])} modules, {params}"


# ---------------------------------------------------------------- writing and reading artifacts

def adapter_info(adapter: LoraAdapter | PrefixAdapter, bound: dict, **extra) -> dict:
    """The ``lora/1`` info of an adapter bound to ``bound``."""
    if isinstance(adapter, PrefixAdapter):
        return {"base": bound, "peft_type": "PREFIX_TUNING", "ranks": {}, "alpha": 0,
                "num_params": adapter.num_params(), **extra}
    return {"base": bound, "peft_type": "LORA", "ranks": adapter.ranks(), "alpha": adapter.config.lora_alpha,
            "num_params": adapter.num_params(), "dora": any(m.magnitude is not None for m in adapter.modules.values()),
            **extra}


def config_bytes(adapter: LoraAdapter | PrefixAdapter) -> bytes:
    """``adapter_config.json`` as PEFT reads it."""
    cfg = adapter.config.to_dict() if isinstance(adapter, LoraAdapter) else dict(adapter.config)
    return json.dumps(cfg, indent=2, sort_keys=True).encode()


def commit_adapter(store: Store, adapter: LoraAdapter | PrefixAdapter, *, info: dict, parents=(), source=None,
                   recipe=None, name: str | None = None, resumed: list | None = None) -> Artifact:
    """Write ``adapter`` (in memory) as a ``lora`` artifact through the engine's copy plan.

    The staging is keyed by the adapter's content, lineage and info, so a run killed midway
    resumes (the names of the tensors it had finished are appended to ``resumed``), an
    interruption keeps what is staged, and any other failure removes it.
    """
    from ..engine import Executor, plan_map
    from ..engine.options import RunOptions
    from ..runs import keep_or_discard

    tensors = DictSource(adapter.state_dict())
    plan = plan_map("copy", {"src": tensors}, {"x": "src"}, where="adapter")
    files = {CONFIG_FILE: config_bytes(adapter)}
    key = job_key(KIND, plan.fingerprint(), list(parents), source, recipe, info, files[CONFIG_FILE].decode())
    writer = store.create(key)
    executor = Executor(plan, writer, RunOptions(device="cpu", max_memory="256M", progress=False))
    keep_or_discard(writer, executor.run)    # an interruption keeps the staging (to resume)
    if resumed is not None:
        resumed.extend(executor.skipped)
    artifact = writer.commit(kind=KIND, parents=list(parents), source=source, recipe=recipe, files=files,
                             run={"device": "cpu"}, info=info)
    if name:
        store.tag(artifact.id, name)
    return artifact


def is_adapter_artifact(store: Store | None, ref: str) -> bool:
    """Whether ``ref`` names a ``lora`` artifact of ``store`` (and not an existing path)."""
    return store is not None and not os.path.exists(ref) and store.has(ref) and store.get(ref).kind == KIND


def _adapter_config(store: Store, ref: str) -> tuple[dict, Artifact]:
    """(the ``adapter_config.json`` artifact ``ref`` carries, the artifact); RecipeError for an
    artifact of another kind, FormatError when it carries no config."""
    artifact = store.get(ref)
    if artifact.kind != KIND:
        raise RecipeError(f"artifact {artifact.short_id} is a {artifact.kind}, not a LoRA adapter")
    cfg_path = store.file_path(ref, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FormatError(f"artifact {artifact.short_id}: no carried {CONFIG_FILE}")
    with open(cfg_path, encoding="utf-8") as f:
        return json.load(f), artifact


def read_adapter_artifact(store: Store, ref: str) -> tuple[LoraAdapter | PrefixAdapter, Artifact]:
    """The adapter held by artifact ``ref`` (tensors read whole: adapters are small)."""
    raw, artifact = _adapter_config(store, ref)
    with store.open(ref) as src:
        tensors = {k: src.read(k) for k in src.keys()}
    where = f"artifact {artifact.short_id}"
    if raw.get("peft_type") == "PREFIX_TUNING":
        return PrefixAdapter(config=raw, prompt_embeddings=tensors["prompt_embeddings"], source=where), artifact
    return _parse_lora(LoraConfig.from_dict(raw, where=where), tensors, where, where), artifact


def export_adapter(store: Store, ref: str, out_dir: str) -> str:
    """Write adapter artifact ``ref`` as a PEFT directory (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` loads; staged and renamed
    into place. Streamed: one tensor in memory at a time (:func:`.peft_io.write_adapter_streamed`;
    the bytes :func:`.peft_io.write_adapter` writes). Returns ``out_dir``.

    Example: ``export_adapter(store, "math-lora", "./math-lora")``.
    """
    from .peft_io import write_adapter_streamed

    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise OutputExists(f"{out_dir} already exists and is not empty")
    raw, artifact = _adapter_config(store, ref)
    with store.open(ref) as src:
        return write_adapter_streamed(raw, src, out_dir, where=f"artifact {artifact.short_id}",
                                      overwrite=os.path.exists(out_dir))


def refuse_other_base(mismatched: list[str], bound: dict, base_ref: str, *, where: str, transfer: bool) -> dict | None:
    """BaseMismatch unless ``transfer``; with it, the transfer record for the lineage (or None
    when the base is the adapter's own)."""
    if not mismatched:
        return None
    if not transfer:
        raise BaseMismatch(f"{where}: the adapter was made for base {describe_base(bound)}, and {base_ref} differs "
                           f"in {len(mismatched)} of its tensors (e.g. {mismatched[0]!r}); pass --transfer to apply "
                           "it to this base anyway")
    return {"from": bound, "to": base_ref, "mismatched": sorted(mismatched)}


__all__ = ["KIND", "WEIGHTS_FILE", "DictSource", "adapter_info", "binding", "check_binding", "commit_adapter",
           "describe_base", "export_adapter", "is_adapter_artifact", "read_adapter_artifact", "refuse_other_base",
           "weight_names"]
