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

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..errors import FormatError, OutputExists, ShapeMismatch, TensorNotFound, UnsafeFormat

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
    def from_dict(cls, d: dict, where: str = CONFIG_FILE) -> "LoraConfig":
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
        return {"peft_type": self.config.get("peft_type"), "base_model_name_or_path": self.config.get("base_model_name_or_path"),
                "num_virtual_tokens": self.config.get("num_virtual_tokens"), "num_layers": self.config.get("num_layers"),
                "num_params": self.num_params(), "mergeable": False}

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
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
    try:
        cfg = adapter.config.to_dict() if isinstance(adapter, LoraAdapter) else dict(adapter.config)
        with open(os.path.join(stage, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        save_file(adapter.state_dict(), os.path.join(stage, WEIGHTS_FILE), metadata={"format": "pt"})
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(stage, path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
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
        modules[k] = ModuleLora(module=k, kind=kind, A=A.to(dtype).contiguous(), B=(B.float() / s if fold_scaling else B).to(dtype),
                                scaling=s, alpha=alpha, fan_in_fan_out=fan_in_fan_out and kind == "linear")
    return LoraAdapter(config=cfg, modules=modules)
