"""What a prefix-tuning (P-Tuning v2) adapter depends on in its base, so it can be bound by content.

A prefix adapter holds, for every layer, key / value vectors that attention reads next to the
keys and values the base computes. It changes no weight, but its meaning rests on the base's
shape (layers, width, heads, key-value heads, head size) and on the tensors that make the queries
its keys are matched with and that carry its values on: the token embedding and every attention
projection (q, k, v, o, their biases). The binding records those shape fields from the base's
``config.json`` and the checksums of those tensors, like a LoRA adapter's binding records the
weights it changes; a base that differs in either is another base.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

from ..errors import FormatError

CONFIG_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
_ATTENTION_ROLES = ("embed", "q", "k", "v", "o")
# names of families arch.py does not know: the embedding and the attention block's tensors
_FALLBACK = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings)\.weight$"
                       r"|(^|\.)(self_attn|attn|attention|self_attention)\.[^.]+\.(weight|bias)$")


def read_config(files: Mapping[str, str] | None) -> dict | None:
    """The base's ``config.json`` (from the carried files of ``resolve_input``), or None."""
    path = (files or {}).get("config.json")
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: unreadable ({e})") from None


def shape_fields(config: Mapping) -> dict:
    """The fields of ``config`` a prefix depends on, under their Llama names (GPT-2 style
    ``n_layer`` / ``n_embd`` / ``n_head`` read too); key-value heads and head size filled in."""
    if isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    hidden = config.get("hidden_size", config.get("n_embd"))
    heads = config.get("num_attention_heads", config.get("n_head"))
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    return dict(zip(CONFIG_FIELDS, (layers, hidden, heads, kv, head_dim)))


def dependencies(names: Iterable[str], config: Mapping | None) -> list[str]:
    """The base tensors a prefix adapter depends on: the token embedding and every attention
    projection, by the roles of :mod:`tensorstore_llm.arch` for a known family, by name otherwise."""
    from ..arch import ALIASES, FAMILIES, Architecture

    names = list(names)
    model_type = str((config or {}).get("model_type", ""))
    if config is not None and ALIASES.get(model_type, model_type) in FAMILIES:
        arch = Architecture.from_config(dict(config))
        return sorted(n for n in names if arch.role(n).role in _ATTENTION_ROLES)
    return sorted(n for n in names if _FALLBACK.search(n))


def config_mismatches(bound_fields: Mapping, config: Mapping | None) -> list[str]:
    """``config.json <field>`` for each recorded shape field the base's config does not match."""
    if config is None:
        return ["config.json (the base has none)"]
    have = shape_fields(config)
    return [f"config.json {k} ({have.get(k)} here, {v} recorded)" for k, v in bound_fields.items() if have.get(k) != v]


__all__ = ["CONFIG_FIELDS", "config_mismatches", "dependencies", "read_config", "shape_fields"]
