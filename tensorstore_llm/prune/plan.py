"""Pruning plans: which MLP channels and key-value heads each layer keeps, or which mask applies.

A :class:`PruningPlan` is the first-class record LoRAM's recovery needs (SPEC section 5): per layer,
the kept intermediate channels and the kept key-value heads (a KV head takes its group of query
heads with it under grouped-query attention), or for unstructured / N:M plans the mask pattern.
It is bound to its base by the checksums of the weights it prunes, so it is never applied to
another model silently (BaseMismatch).

Stored as a ``pruning_plan`` artifact: tensors ``layers.{i}.kept_channels`` and
``layers.{i}.kept_kv_heads`` (int64, sorted), Wanda's calibration norms ``norms.{module}``
(float32) for activation-aware masks, and ``info`` (schema pruning_plan/2): the base binding, the
method, the structure, the original sizes and the settings.

Example:
    >>> from tensorstore_llm.arch import Architecture
    >>> arch = Architecture.from_config({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 8,
    ...     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 6, "vocab_size": 10})
    >>> plan = PruningPlan(arch, "structured", "magnitude", channels={0: (0, 2, 5)}, kv_heads={0: (1,)})
    >>> plan.rows("q", 0)
    [4, 5, 6, 7]
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..arch import Architecture
from ..errors import BaseMismatch, FormatError, InvalidParameter, ShapeMismatch

STRUCTURES = ("structured", "unstructured", "n:m")
PRUNED_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class PruningPlan:
    """Kept units per layer (structured) or a mask pattern (unstructured / n:m), for ``arch``.

    ``channels`` / ``kv_heads``: layer -> sorted kept indices; layers absent keep everything.
    ``mask``: {"pattern", "sparsity", "n", "m", "score"} for mask plans; ``norms``: module ->
    per-input-feature activation norm (Wanda). ``base``: the binding (id, checksums).
    """

    arch: Architecture
    structure: str
    method: str
    channels: dict[int, tuple[int, ...]] = field(default_factory=dict)
    kv_heads: dict[int, tuple[int, ...]] = field(default_factory=dict)
    mask: dict = field(default_factory=dict)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    base: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.structure not in STRUCTURES:
            raise FormatError(f"pruning plan: structure {self.structure!r} is not one of {', '.join(STRUCTURES)}")
        for layer, kept in self.channels.items():
            _check_units(kept, self.arch.intermediate_size, f"layer {layer} MLP channels", layer, self.arch.num_layers)
        for layer, kept in self.kv_heads.items():
            _check_units(kept, self.arch.num_kv_heads, f"layer {layer} key-value heads", layer, self.arch.num_layers)

    # -- what is kept ------------------------------------------------------------------------------
    def kept_channels(self, layer: int) -> tuple[int, ...]:
        return self.channels.get(layer, tuple(range(self.arch.intermediate_size)))

    def kept_kv_heads(self, layer: int) -> tuple[int, ...]:
        return self.kv_heads.get(layer, tuple(range(self.arch.num_kv_heads)))

    def kept_q_heads(self, layer: int) -> tuple[int, ...]:
        return tuple(q for kv in self.kept_kv_heads(layer) for q in self.arch.query_heads_of(kv))

    def rows(self, role: str, layer: int) -> list[int]:
        """Kept indices along the unit axis of a weight with ``role`` (rows of q/k/v/gate/up,
        columns of o/down) in ``layer``."""
        hd = self.arch.head_dim
        if role in ("gate", "up", "down"):
            return list(self.kept_channels(layer))
        heads = self.kept_kv_heads(layer) if role in ("k", "v") else self.kept_q_heads(layer)
        return [h * hd + d for h in heads for d in range(hd)]

    def full_width(self, role: str) -> int:
        """Length of the unit axis of ``role`` in the full model."""
        if role in ("gate", "up", "down"):
            return self.arch.intermediate_size
        heads = self.arch.num_kv_heads if role in ("k", "v") else self.arch.num_heads
        return heads * self.arch.head_dim

    def pruned(self, role: str, layer: int) -> list[int]:
        """Indices along the unit axis of ``role`` that the plan removes in ``layer``."""
        kept = set(self.rows(role, layer))
        return [i for i in range(self.full_width(role)) if i not in kept]

    def layer_sizes(self) -> list[dict]:
        """Per layer: intermediate size, KV heads and query heads after pruning."""
        return [{"intermediate_size": len(self.kept_channels(i)), "num_key_value_heads": len(self.kept_kv_heads(i)),
                 "num_attention_heads": len(self.kept_q_heads(i))} for i in range(self.arch.num_layers)]

    @property
    def uniform(self) -> bool:
        """Whether every layer has the same sizes after pruning (a plain HF config describes it)."""
        sizes = self.layer_sizes()
        return all(s == sizes[0] for s in sizes)

    def removed_fraction(self) -> dict:
        """Fractions of MLP channels and KV heads removed over all layers."""
        a = self.arch
        ch = sum(len(self.kept_channels(i)) for i in range(a.num_layers))
        kv = sum(len(self.kept_kv_heads(i)) for i in range(a.num_layers))
        return {"mlp_channels": 1 - ch / (a.intermediate_size * a.num_layers),
                "kv_heads": 1 - kv / (a.num_kv_heads * a.num_layers)}

    # -- serialisation ------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the plan artifact."""
        out = {}
        for layer, kept in sorted(self.channels.items()):
            out[f"layers.{layer}.kept_channels"] = torch.tensor(kept, dtype=torch.int64)
        for layer, kept in sorted(self.kv_heads.items()):
            out[f"layers.{layer}.kept_kv_heads"] = torch.tensor(kept, dtype=torch.int64)
        for module, norm in sorted(self.norms.items()):
            out[f"norms.{module}"] = norm.float().contiguous()
        return out

    def info(self) -> dict:
        """The artifact's ``info`` (schema pruning_plan/2)."""
        a = self.arch
        return {"base": self.base, "method": self.method, "structure": self.structure, "mask": self.mask,
                "original": {"family": a.family, "num_hidden_layers": a.num_layers, "hidden_size": a.hidden_size,
                             "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads,
                             "head_dim": a.head_dim, "intermediate_size": a.intermediate_size,
                             "vocab_size": a.vocab_size},
                "layers": self.layer_sizes(), "uniform": self.uniform, "settings": self.settings}

    @classmethod
    def from_artifact(cls, info: dict, tensors: dict[str, torch.Tensor], where: str) -> PruningPlan:
        """Rebuild a plan from an artifact's ``info`` and tensors."""
        try:
            o = info["original"]
            arch = Architecture(family=o["family"], num_layers=int(o["num_hidden_layers"]),
                                hidden_size=int(o["hidden_size"]), num_heads=int(o["num_attention_heads"]),
                                num_kv_heads=int(o["num_key_value_heads"]), head_dim=int(o["head_dim"]),
                                intermediate_size=int(o["intermediate_size"]), vocab_size=int(o["vocab_size"]))
            channels, kv_heads, norms = {}, {}, {}
            for name, t in tensors.items():
                if name.startswith("norms."):
                    norms[name[len("norms."):]] = t
                    continue
                _, layer, kind = name.split(".")
                target = channels if kind == "kept_channels" else kv_heads if kind == "kept_kv_heads" else None
                if target is None:
                    raise ValueError(f"unexpected tensor {name!r}")
                target[int(layer)] = tuple(int(i) for i in t.tolist())
            return cls(arch, info["structure"], info["method"], channels, kv_heads, dict(info.get("mask") or {}), norms,
                       dict(info.get("settings") or {}), dict(info["base"]))
        except (KeyError, ValueError, TypeError) as e:
            raise FormatError(f"{where}: not a readable pruning plan ({e})") from None


def _check_units(kept, total: int, what: str, layer: int, layers: int) -> None:
    if not 0 <= layer < layers:
        raise InvalidParameter(f"pruning plan: layer {layer} does not exist (the model has {layers} layers)")
    if not kept:
        raise InvalidParameter(f"pruning plan: {what}: every unit would be removed; keep at least one")
    if list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= total:
        raise InvalidParameter(f"pruning plan: {what} must be distinct sorted indices in [0, {total}), got "
                               f"{list(kept)[:8]}{'...' if len(kept) > 8 else ''}")


def check_binding(plan: PruningPlan, checksums: dict[str, str], where: str) -> None:
    """Raise BaseMismatch unless ``checksums`` (tensor -> checksum of a candidate base) agree with
    every tensor the plan was made from."""
    bound = plan.base.get("checksums") or {}
    for name, expected in sorted(bound.items()):
        got = checksums.get(name)
        if got != expected:
            state = "is missing" if got is None else f"has checksum {got[:19]}..."
            made_from = (plan.base.get("id") or "")[:12] or plan.base.get("external")
            raise BaseMismatch(f"{where}: the pruning plan was made from base {made_from} "
                               f"whose tensor {name!r} has checksum {expected[:19]}...; this model's {state}: "
                               f"a plan for another base")


def check_shapes(plan: PruningPlan, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise ShapeMismatch unless the prunable weights of ``shapes`` are the full model's."""
    a = plan.arch
    for name, shape in shapes.items():
        role = a.role(name)
        if role.role in PRUNED_ROLES and role.kind == "weight" and role.layer is not None:
            width = shape[role.axis] if len(shape) == 2 else None
            if width != plan.full_width(role.role):
                raise ShapeMismatch(f"{where}: tensor {name!r} has shape {list(shape)}, but the plan's base has "
                                    f"{plan.full_width(role.role)} along axis {role.axis}")


def read_index_file(path: str, arch: Architecture) -> tuple[dict, dict]:
    """Kept channels / KV heads per layer from a JSON index file.

    Format: ``{"layers": {"<i>": {"kept_channels" | "pruned_channels": [...],
    "kept_kv_heads" | "pruned_kv_heads": [...]}}}``; layers or keys left out keep everything.
    Returns (channels, kv_heads) as layer -> sorted kept indices.
    """
    try:
        with open(path, "rb") as f:
            body = json.loads(f.read())
        layers = body["layers"]
        if not isinstance(layers, dict):
            raise TypeError("'layers' must map layer index -> entry")
    except FileNotFoundError:
        raise FormatError(f"{path}: no such index file") from None
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{path}: not a pruning index file ({e.__class__.__name__}: {e}); expected "
                          '{"layers": {"0": {"pruned_channels": [...], "pruned_kv_heads": [...]}}}') from None
    channels, kv_heads = {}, {}
    for key, entry in layers.items():
        try:
            layer = int(key)
        except ValueError:
            raise FormatError(f"{path}: layer key {key!r} is not an integer") from None
        units = (("channels", arch.intermediate_size, channels), ("kv_heads", arch.num_kv_heads, kv_heads))
        for unit, total, target in units:
            kept, pruned = entry.get(f"kept_{unit}"), entry.get(f"pruned_{unit}")
            if kept is not None and pruned is not None:
                raise FormatError(f"{path}: layer {layer} gives both kept_{unit} and pruned_{unit}")
            if pruned is not None:
                bad = [i for i in pruned if not isinstance(i, int) or not 0 <= i < total]
                if bad:
                    raise FormatError(f"{path}: layer {layer} pruned_{unit} {bad[:4]} outside [0, {total})")
                kept = [i for i in range(total) if i not in set(pruned)]
            if kept is not None:
                target[layer] = tuple(sorted(set(int(i) for i in kept)))
    return channels, kv_heads
