"""Model structure as data: which tensor is which, read from a checkpoint's ``config.json``.

Every weight of a supported decoder gets a role (embed, q, k, v, o, gate, up, down, norm,
lm_head, ...), its layer index, and for attention and MLP weights the axis that holds heads or
intermediate channels, so pruning, LoRA targeting and layer-wise merges never guess from names.
The tensor names of each family are listed below as templates (mergekit's architecture files are
the model for this: data, not code). An unknown ``model_type`` is refused with the list of those
that are known; a tensor no template matches gets the role ``other``.

Example:
    >>> arch = Architecture.from_config({"model_type": "llama", "num_hidden_layers": 2,
    ...     "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
    ...     "intermediate_size": 128, "vocab_size": 100})
    >>> arch.role("model.layers.1.self_attn.k_proj.weight")
    TensorRole(role='k', layer=1, axis=0, unit='kv_head', kind='weight')
    >>> list(arch.query_heads_of(1))
    [2, 3]
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from .errors import FormatError

# role -> (axis of the unit, unit) for the roles whose rows / columns belong to heads or channels
_UNITS = {
    "q": (0, "q_head"), "k": (0, "kv_head"), "v": (0, "kv_head"), "o": (1, "q_head"),
    "gate": (0, "channel"), "up": (0, "channel"), "down": (1, "channel"),
}

_LLAMA = {
    "model.embed_tokens": "embed",
    "model.layers.{i}.self_attn.q_proj": "q",
    "model.layers.{i}.self_attn.k_proj": "k",
    "model.layers.{i}.self_attn.v_proj": "v",
    "model.layers.{i}.self_attn.o_proj": "o",
    "model.layers.{i}.mlp.gate_proj": "gate",
    "model.layers.{i}.mlp.up_proj": "up",
    "model.layers.{i}.mlp.down_proj": "down",
    "model.layers.{i}.input_layernorm": "norm",
    "model.layers.{i}.post_attention_layernorm": "norm",
    "model.layers.{i}.self_attn.rotary_emb.inv_freq": "buffer",
    "model.norm": "final_norm",
    "lm_head": "lm_head",
}
_QK_NORM = {"model.layers.{i}.self_attn.q_norm": "norm", "model.layers.{i}.self_attn.k_norm": "norm"}
_GEMMA2 = {**_LLAMA, "model.layers.{i}.pre_feedforward_layernorm": "norm",
           "model.layers.{i}.post_feedforward_layernorm": "norm"}

FAMILIES: dict[str, dict[str, str]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,          # q/k/v carry biases: the same roles, kind "bias"
    "qwen3": {**_LLAMA, **_QK_NORM},
    "gemma": _LLAMA,
    "gemma2": _GEMMA2,
    "gemma3_text": {**_GEMMA2, **_QK_NORM},
}
# model_type values whose text model uses one of the families above
ALIASES = {"gemma3": "gemma3_text", "smollm3": "llama", "granite": "llama"}


@dataclass(frozen=True)
class TensorRole:
    """What one tensor is: ``role``, its ``layer`` (None outside the layers), and for weights
    split into heads or channels the ``axis`` that holds them and the ``unit`` (q_head,
    kv_head, channel); ``kind`` is weight or bias."""

    role: str
    layer: int | None = None
    axis: int | None = None
    unit: str | None = None
    kind: str = "weight"


@dataclass(frozen=True)
class Architecture:
    """The structure of a decoder-only transformer, from its config."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: dict, where: str = "config.json") -> Architecture:
        """Read the structure from a ``config.json`` dict; FormatError for an unknown family or
        missing / inconsistent sizes (e.g. heads that do not divide into key-value groups)."""
        if isinstance(config.get("text_config"), dict):     # multimodal wrappers (Gemma 3)
            config = {**config["text_config"], "model_type": config["text_config"].get("model_type", config.get("model_type"))}
        model_type = str(config.get("model_type", ""))
        family = ALIASES.get(model_type, model_type)
        if family not in FAMILIES:
            raise FormatError(f"{where}: model_type {model_type!r} is not a known layout; known: "
                              f"{', '.join(sorted({*FAMILIES, *ALIASES}))}")
        try:
            heads = int(config["num_attention_heads"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            hidden = int(config["hidden_size"])
            arch = cls(family=family, num_layers=int(config["num_hidden_layers"]), hidden_size=hidden,
                       num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=int(config.get("head_dim") or hidden // heads),
                       intermediate_size=int(config["intermediate_size"]), vocab_size=int(config["vocab_size"]),
                       tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: cannot read the model's sizes ({e.__class__.__name__}: {e})") from None
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
            raise FormatError(f"{where}: {heads} attention heads do not split into {kv_heads} key-value groups")
        return arch

    @classmethod
    def from_dir(cls, path: str) -> Architecture:
        """The structure of the checkpoint directory (or artifact ``files/`` directory) ``path``."""
        config_path = os.path.join(path, "config.json")
        try:
            with open(config_path, "rb") as f:
                config = json.loads(f.read())
        except FileNotFoundError:
            raise FormatError(f"{path}: no config.json, so the model's structure is unknown") from None
        except (OSError, ValueError) as e:
            raise FormatError(f"{config_path}: unreadable ({e})") from None
        return cls.from_config(config, config_path)

    @property
    def group_size(self) -> int:
        """Query heads per key-value head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def query_heads_of(self, kv_head: int) -> range:
        """The query heads that attend with key-value head ``kv_head``."""
        return range(kv_head * self.group_size, (kv_head + 1) * self.group_size)

    def unit_slice(self, role: TensorRole, index: int) -> slice:
        """The rows (axis 0) or columns (axis 1) of a weight with ``role`` that belong to unit
        ``index`` (a head or an MLP channel)."""
        if role.unit is None:
            raise FormatError(f"a {role.role} tensor is not split into heads or channels")
        width = 1 if role.unit == "channel" else self.head_dim
        return slice(index * width, (index + 1) * width)

    def role(self, name: str) -> TensorRole:
        """The role of tensor ``name`` (``other`` if no template of the family matches)."""
        for pattern, role in _PATTERNS[self.family]:
            match = pattern.match(name)
            if match:
                layer = int(match.group("i")) if "i" in pattern.groupindex else None
                kind = "bias" if match.group("kind") == "bias" else "weight"
                axis, unit = _UNITS.get(role, (None, None))
                if kind == "bias" and axis == 1:
                    axis, unit = None, None     # an o / down bias is per output, not per unit
                return TensorRole(role, layer, axis, unit, kind)
        return TensorRole("other")

    def roles(self, names) -> dict[str, TensorRole]:
        """``role`` of each name."""
        return {n: self.role(n) for n in names}


def _patterns(table: dict[str, str]) -> list:
    """Templates as anchored patterns: ``{i}`` is the layer index; the tensor is the module's
    ``.weight`` or ``.bias`` (or the bare name for buffers)."""
    out = []
    for template, role in table.items():
        body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
        out.append((re.compile(rf"^{body}(?:\.(?P<kind>weight|bias))?$"), role))
    return out


_PATTERNS = {family: _patterns(table) for family, table in FAMILIES.items()}
