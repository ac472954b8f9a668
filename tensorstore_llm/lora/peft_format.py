"""The PEFT adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reads and writes LoRA adapters (``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern`` /
``alpha_pattern`` with PEFT's key matching, ``target_modules``, ``modules_to_save``, embedding
LoRA, ``fan_in_fan_out`` Conv1D layouts, DoRA's ``lora_magnitude_vector``, ``lora_bias``) and
prefix-tuning (P-Tuning v2) adapters. ``adapter_model.bin`` (pickle) is refused: loading it can
run code.

Key names. PEFT saves ``base_model.model.<module>.lora_A.weight`` (``lora_B.weight``,
``lora_B.bias``, ``lora_embedding_A``, ``lora_embedding_B``, ``lora_magnitude_vector``), where
``<module>`` is the module path inside the transformers model, so the base tensor is
``<module>.weight``. ``modules_to_save`` are saved as whole tensors,
``base_model.model.<module>.weight``, and an embedding targeted by LoRA may carry its own base
weight as ``<module>.base_layer.weight`` (PEFT's ``save_embedding_layers``), which PEFT loads over
the base model's.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import FormatError, ShapeMismatch, TensorNotFound

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
PREFIX = "base_model.model."

_LORA_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias",
    ".lora_embedding_A": "A_emb", ".lora_embedding_B": "B_emb",
    ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
    ".base_layer.weight": "base_layer",
}


# ---------------------------------------------------------------- key names

def split_peft_key(key: str) -> tuple[str, str | None]:
    """(module, part) of a PEFT adapter key; part is None for a ``modules_to_save`` tensor,
    whose module is then the full base tensor name.

    >>> split_peft_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    ('model.layers.0.self_attn.q_proj', 'A')
    >>> split_peft_key("base_model.model.lm_head.weight")
    ('lm_head.weight', None)
    """
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix in sorted(_LORA_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)], _LORA_SUFFIXES[suffix]
    return name, None


def peft_key(module: str, part: str) -> str:
    """The PEFT key of a factor: inverse of :func:`split_peft_key` (``part`` A, B, bias, A_emb,
    B_emb, magnitude, base_layer; None for a saved whole tensor named ``module``).

    >>> peft_key("model.layers.0.mlp.up_proj", "B")
    'base_model.model.model.layers.0.mlp.up_proj.lora_B.weight'
    """
    if part is None:
        return PREFIX + module
    suffix = {"A": ".lora_A.weight", "B": ".lora_B.weight", "bias": ".lora_B.bias",
              "A_emb": ".lora_embedding_A", "B_emb": ".lora_embedding_B",
              "magnitude": ".lora_magnitude_vector", "base_layer": ".base_layer.weight"}[part]
    return PREFIX + module + suffix


def layer_index(module: str) -> int | None:
    """The first numbered path segment of a module name (its layer), as PEFT finds it.

    >>> layer_index("model.layers.12.mlp.down_proj"), layer_index("lm_head")
    (12, None)
    """
    m = re.match(r".*?\.[^.]*\.(\d+)\.", module + ".") or re.match(r"^[^.]*\.(\d+)\.", module + ".")
    return int(m.group(1)) if m else None


def pattern_key(patterns, module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern p with ``re.match(rf"(.*\\.)?({p})$", module)``."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", module):
            return p
    return None


# ---------------------------------------------------------------- config

@dataclass
class LoraConfig:
    """The fields of PEFT's LoraConfig that decide what a LoRA adapter does to its base.

    ``extra`` keeps every other field read from ``adapter_config.json`` so a round trip keeps it.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    base_model_name_or_path: str | None = None
    extra: dict = field(default_factory=dict)

    _FIELDS = ("r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern",
               "modules_to_save", "fan_in_fan_out", "use_dora", "lora_bias", "exclude_modules",
               "layers_to_transform", "layers_pattern", "base_model_name_or_path")

    @classmethod
    def from_dict(cls, d: dict, where: str = CONFIG_FILE) -> LoraConfig:
        """Parse a PEFT ``adapter_config.json`` dict (peft_type LORA); FormatError if malformed."""
        kw = {k: d[k] for k in cls._FIELDS if k in d and d[k] is not None}
        kw["rank_pattern"] = dict(kw.get("rank_pattern") or {})
        kw["alpha_pattern"] = dict(kw.get("alpha_pattern") or {})
        cfg = cls(**kw, extra={k: v for k, v in d.items() if k not in cls._FIELDS})
        for name, r in [("r", cfg.r)] + [(f"rank_pattern[{k!r}]", v) for k, v in cfg.rank_pattern.items()]:
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                raise FormatError(f"{where}: {name} must be a positive integer rank, got {r!r}")
        return cfg

    def to_dict(self) -> dict:
        """The JSON dict PEFT reads back (``peft_type`` LORA; other fields kept from ``extra``)."""
        d = {"bias": "none", "lora_dropout": 0.0, "inference_mode": True, "init_lora_weights": True,
             "task_type": None, "revision": None}
        d.update(self.extra)
        d.update({k: getattr(self, k) for k in self._FIELDS})
        d["peft_type"] = "LORA"
        if isinstance(d["target_modules"], (set, tuple)):
            d["target_modules"] = sorted(d["target_modules"])
        return d

    def rank_for(self, module: str) -> int:
        """r for ``module``: ``rank_pattern`` by PEFT's matching rule, else ``r``."""
        k = pattern_key(self.rank_pattern.keys(), module)
        return self.rank_pattern[k] if k is not None else self.r

    def alpha_for(self, module: str) -> float:
        """lora_alpha for ``module``: ``alpha_pattern`` by PEFT's matching rule, else ``lora_alpha``."""
        k = pattern_key(self.alpha_pattern.keys(), module)
        return self.alpha_pattern[k] if k is not None else self.lora_alpha

    def scaling_for(self, module: str) -> float:
        """PEFT's ``scaling``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether PEFT would put a LoRA on ``module`` (``check_target_module_exists``)."""
        def listed(spec) -> bool:
            if isinstance(spec, str):
                return re.fullmatch(spec, module) is not None
            return module in spec or any(module.endswith("." + t) for t in spec)

        if self.exclude_modules and listed(self.exclude_modules):
            return False
        if self.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.modules_to_save):
            return False
        if self.target_modules is None or not listed(self.target_modules):
            return False
        if self.layers_to_transform is None or self.layers_to_transform == []:
            return True
        idx = layer_index(module)
        wanted = self.layers_to_transform
        return idx is not None and (idx == wanted if isinstance(wanted, int) else idx in wanted)


# ---------------------------------------------------------------- adapters

@dataclass
class ModuleLora:
    """One module's LoRA factors. ``kind`` is "linear" (A: r x in, B: out x r) or "embedding"
    (A: r x vocab, B: dim x r). ``transpose`` says the base weight is stored in x out."""

    module: str
    kind: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    alpha: float
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def transpose(self) -> bool:
        return self.kind == "embedding" or self.fan_in_fan_out

    @property
    def weight_name(self) -> str:
        """The base tensor this LoRA updates."""
        return self.module + ".weight"

    @property
    def base_shape(self) -> tuple[int, int]:
        """Shape the base weight must have, in its stored layout."""
        out, inp = self.B.shape[0], self.A.shape[1]
        return (inp, out) if self.transpose else (out, inp)

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in (self.A, self.B, self.magnitude, self.bias) if t is not None)


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter in memory.

    ``modules``: module name -> :class:`ModuleLora`; ``saved_modules``: base tensor name -> whole
    replacement tensor (``modules_to_save``); ``base_layers``: base tensor name -> base weight
    saved with the adapter (embeddings, PEFT's ``save_embedding_layers``).
    """

    config: LoraConfig
    modules: dict[str, ModuleLora]
    saved_modules: dict[str, torch.Tensor] = field(default_factory=dict)
    base_layers: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str | None = None

    def ranks(self) -> dict[str, int]:
        """Module -> rank."""
        return {k: m.r for k, m in self.modules.items()}

    def num_params(self) -> int:
        """LoRA parameters plus saved whole modules."""
        return sum(m.num_params for m in self.modules.values()) + sum(t.numel() for t in self.saved_modules.values())

    def describe(self) -> dict:
        """What ``tsllm show`` prints for an adapter: base, kind, rank per module, parameters.

        >>> build_adapter({"fc": (torch.ones(2, 3), torch.ones(4, 2))}).describe()["num_params"]
        14
        """
        return {"peft_type": "LORA", "base_model_name_or_path": self.config.base_model_name_or_path,
                "dora": any(m.magnitude is not None for m in self.modules.values()),
                "use_rslora": self.config.use_rslora, "ranks": self.ranks(),
                "embedding_modules": sorted(k for k, m in self.modules.items() if m.kind == "embedding"),
                "modules_to_save": sorted(self.saved_modules), "num_params": self.num_params()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under PEFT's key names, as ``adapter_model.safetensors`` holds them."""
        out = {}
        for name, m in self.modules.items():
            a, b = ("A_emb", "B_emb") if m.kind == "embedding" else ("A", "B")
            out[peft_key(name, a)] = m.A
            out[peft_key(name, b)] = m.B
            if m.magnitude is not None:
                out[peft_key(name, "magnitude")] = m.magnitude
            if m.bias is not None:
                out[peft_key(name, "bias")] = m.bias
        for name, t in self.saved_modules.items():
            out[peft_key(name, None)] = t
        for name, t in self.base_layers.items():
            out[peft_key(name[: -len(".weight")], "base_layer")] = t
        return {k: v.contiguous() for k, v in out.items()}

    def validate_base(self, base: Mapping[str, tuple[int, ...]], where: str = "base") -> None:
        """Check the adapter fits a base given as tensor name -> shape.

        Raises TensorNotFound for a target or saved module missing from the base and
        ShapeMismatch for factors whose shapes do not fit, naming the adapter file and key.
        """
        src = self.source or "adapter"
        for name, m in self.modules.items():
            key = peft_key(name, "A_emb" if m.kind == "embedding" else "A")
            if m.weight_name not in base:
                raise TensorNotFound(f"{src}: target module {name!r} ({key}) has no tensor "
                                     f"{m.weight_name!r} in {where}")
            have = tuple(self.base_layers[m.weight_name].shape) if m.weight_name in self.base_layers \
                else tuple(base[m.weight_name])
            if have != m.base_shape:
                raise ShapeMismatch(f"{src}: {key} with lora_B {tuple(m.B.shape)} needs {m.weight_name} of "
                                    f"shape {m.base_shape} ({m.kind}{', fan_in_fan_out' if m.fan_in_fan_out else ''}),"
                                    f" {where} has {have}")
        for name, t in self.saved_modules.items():
            if name not in base:
                raise TensorNotFound(f"{src}: modules_to_save tensor {name!r} is not in {where}")
            if tuple(base[name]) != tuple(t.shape):
                raise ShapeMismatch(f"{src}: modules_to_save tensor {name!r} has shape {tuple(t.shape)}, "
                                    f"{where} has {tuple(base[name])}")


@dataclass
class PrefixAdapter:
    """A PEFT prefix-tuning (P-Tuning v2) adapter: per-layer key/value prefixes.

    ``prompt_embeddings``: num_virtual_tokens x (num_layers * 2 * token_dim). It changes the
    attention inputs, not the weights, so it cannot be merged into a base.
    """

    config: dict
    prompt_embeddings: torch.Tensor
    source: str | None = None

    def num_params(self) -> int:
        return self.prompt_embeddings.numel()

    def describe(self) -> dict:
        """Base, virtual tokens, layers and parameter count of the prefix adapter."""
        fields = ("peft_type", "base_model_name_or_path", "num_virtual_tokens", "num_layers")
        return {**{k: self.config.get(k) for k in fields}, "num_params": self.num_params(), "mergeable": False}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prompt_embeddings.contiguous()}

    def validate_base(self, base_config: Mapping) -> None:
        """Check layer count and key/value width against a transformers ``config.json`` dict."""
        src = self.source or "adapter"
        layers = base_config.get("num_hidden_layers", base_config.get("n_layer"))
        heads = base_config.get("num_attention_heads", base_config.get("n_head"))
        hidden = base_config.get("hidden_size", base_config.get("n_embd"))
        kv = base_config.get("num_key_value_heads", heads)
        head_dim = base_config.get("head_dim") or (hidden // heads if hidden and heads else None)
        if layers is not None and self.config.get("num_layers") != layers:
            raise ShapeMismatch(f"{src}: prefix for {self.config.get('num_layers')} layers, base has {layers}")
        if head_dim and kv and self.config.get("token_dim") not in (kv * head_dim, hidden):
            raise ShapeMismatch(f"{src}: prefix token_dim {self.config.get('token_dim')}, base key/value width "
                                f"is {kv * head_dim}")


# reading, writing and building adapters live in peft_io (kept importable from here)
from .peft_io import _fail_pickle, _parse_lora, build_adapter, read_adapter, write_adapter  # noqa: E402,F401
