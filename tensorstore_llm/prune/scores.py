"""Importance of MLP channels and key-value heads, and the per-layer choice of what to keep.

Scores are computed by reduction jobs of the engine (op ``unit_scores`` / ``unit_scores_wanda``),
one per prunable weight, so a 70B model is scored within ``--max-memory`` without being loaded:

- ``magnitude``: the L2 norm of all weights of a unit (a channel: its gate and up rows and its
  down column; a KV head: its k and v rows, the q rows of its query group and their o columns);
- ``wanda``: the sum of Wanda scores |W|·‖x‖ over the same weights (x: each module's input
  feature norms over a calibration corpus, see :mod:`.calibrate`);
- ``scores``: a user-supplied safetensors file with ``layers.{i}.channels`` (intermediate_size,)
  and / or ``layers.{i}.kv_heads`` (num_key_value_heads,); higher means more important.

Selection keeps the ``round((1 - ratio) * units)`` highest-scoring units of each layer (ties to
the lower index), with the first / last layers excludable as in LoRAM's reference (first 4, last 2).
"""
from __future__ import annotations

import json
import math

import torch

from ..arch import Architecture
from ..default_budget import DEFAULT_MAX_MEMORY
from ..errors import FormatError, InvalidParameter
from ..io.base import TensorMeta
from .plan import PRUNED_ROLES


class MemorySource:
    """A TensorSource over a dict of small in-memory tensors (calibration norms for a job)."""

    def __init__(self, tensors: dict[str, torch.Tensor], label: str = "calibration norms"):
        import hashlib

        self.tensors = {k: v.contiguous() for k, v in tensors.items()}
        digest = hashlib.sha256()
        for k in sorted(self.tensors):
            digest.update(k.encode() + self.tensors[k].numpy().tobytes())
        self.identity = f"memory:{digest.hexdigest()}"
        self.path = label

    def keys(self):
        return list(self.tensors)

    def meta(self, name):
        from ..errors import TensorNotFound

        if name not in self.tensors:
            raise TensorNotFound(f"{self.path}: no tensor {name!r}")
        t = self.tensors[name]
        return TensorMeta(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))

    def metas(self):
        return [self.meta(k) for k in self.keys()]

    def read(self, name):
        return self.tensors[name]

    def read_rows(self, name, start, stop):
        return self.tensors[name][start:stop]

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def unit_scores(source, arch: Architecture, metric: str, norms: dict[str, torch.Tensor] | None = None, *,
                max_memory=DEFAULT_MAX_MEMORY, device="cpu",
                progress=False) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """(channel scores, KV-head scores) per layer of the model in ``source``.

    ``metric`` is ``l2`` (magnitude) or ``wanda`` (needs ``norms``: module -> input feature norms).
    Returns layer -> float64 tensor of intermediate_size / num_key_value_heads scores.
    """
    from ..engine.executor import Executor
    from ..engine.options import RunOptions
    from ..engine.plan import WHOLE, InputRef, Plan, TensorJob
    from ..ops.prune import ScoreParams

    jobs, sources = [], {"base": source}
    if metric == "wanda":
        sources["norms"] = MemorySource({k + ".input_norm": v.float() for k, v in (norms or {}).items()})
    weights = []
    for name in source.keys():
        role = arch.role(name)
        if role.role in PRUNED_ROLES and role.kind == "weight" and role.layer is not None:
            params = ScoreParams(axis=role.axis, metric=metric)
            inputs = [("w", InputRef("base", name))]
            op = "unit_scores"
            if metric == "wanda":
                module = name[: -len(".weight")]
                if module not in (norms or {}):
                    raise FormatError(f"calibration: no activation norms were recorded for {module!r}")
                inputs.append(("norm", InputRef("norms", module + ".input_norm", WHOLE)))
                op = "unit_scores_wanda"
            jobs.append(TensorJob(source.meta(name), op, tuple(inputs), params, reduce_only=True))
            weights.append((name, role))
    executor = Executor(Plan(jobs, sources), None, RunOptions(device=device, max_memory=max_memory, progress=progress),
                        desc="pruning scores")
    executor.run()
    channels = {i: torch.zeros(arch.intermediate_size, dtype=torch.float64) for i in range(arch.num_layers)}
    heads = {i: torch.zeros(arch.num_kv_heads, dtype=torch.float64) for i in range(arch.num_layers)}
    hd, group = arch.head_dim, arch.group_size
    for name, role in weights:
        s = torch.tensor(executor.records[name]["scores"], dtype=torch.float64)
        if role.role in ("gate", "up", "down"):
            channels[role.layer] += s
        elif role.role in ("k", "v"):
            heads[role.layer] += s.reshape(arch.num_kv_heads, hd).sum(1)
        else:   # q rows / o columns: the query heads of each KV group
            heads[role.layer] += s.reshape(arch.num_kv_heads, group * hd).sum(1)
    if metric == "l2":
        channels = {i: v.sqrt() for i, v in channels.items()}
        heads = {i: v.sqrt() for i, v in heads.items()}
    return channels, heads


def read_score_file(path: str, arch: Architecture) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """User-supplied scores from a safetensors file (never a pickle): ``layers.{i}.channels`` and
    ``layers.{i}.kv_heads``; missing entries score every unit equally (the lower index wins)."""
    from safetensors import SafetensorError, safe_open

    channels, heads = {}, {}
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                parts = key.split(".")
                if len(parts) != 3 or parts[0] != "layers" or parts[2] not in ("channels", "kv_heads"):
                    raise FormatError(f"{path}: unexpected tensor {key!r}; expected layers.<i>.channels / "
                                      "layers.<i>.kv_heads")
                layer, t = int(parts[1]), f.get_tensor(key).double()
                width = arch.intermediate_size if parts[2] == "channels" else arch.num_kv_heads
                if tuple(t.shape) != (width,) or not 0 <= layer < arch.num_layers:
                    raise FormatError(f"{path}: {key} has shape {tuple(t.shape)}, expected ({width},) for a layer "
                                      f"in [0, {arch.num_layers})")
                (channels if parts[2] == "channels" else heads)[layer] = t
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{path}: not a readable safetensors score file ({e})") from None
    for i in range(arch.num_layers):
        channels.setdefault(i, torch.zeros(arch.intermediate_size, dtype=torch.float64))
        heads.setdefault(i, torch.zeros(arch.num_kv_heads, dtype=torch.float64))
    return channels, heads


def check_ratio(value: float, what: str) -> float:
    """A pruning ratio must be a finite number in [0, 1)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not 0 <= value < 1:
        raise InvalidParameter(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def layer_ratios(num_layers: int, ratio: float | None, per_layer: list | dict | None = None, *,
                 keep_first: int = 0, keep_last: int = 0, what: str = "--ratio") -> list[float]:
    """The pruning ratio of each layer: ``ratio`` everywhere, or ``per_layer`` (a list, or a dict
    layer -> ratio, others 0); the first ``keep_first`` and last ``keep_last`` layers get 0."""
    if keep_first < 0 or keep_last < 0:
        raise InvalidParameter(f"--keep-first / --keep-last must be >= 0, got {keep_first}, {keep_last}")
    if per_layer is not None:
        if isinstance(per_layer, dict):
            out = [0.0] * num_layers
            for k, v in per_layer.items():
                if not str(k).isdigit() or int(k) >= num_layers:
                    raise InvalidParameter(f"per-layer ratios: layer {k!r} does not exist (the model has {num_layers})")
                out[int(k)] = v
        else:
            out = list(per_layer)
            if len(out) != num_layers:
                raise InvalidParameter(f"per-layer ratios: {len(out)} values for a model with {num_layers} layers")
        out = [check_ratio(v, f"per-layer ratio of layer {i}") for i, v in enumerate(out)]
    else:
        out = [check_ratio(ratio or 0.0, what)] * num_layers
    for i in range(num_layers):
        if i < keep_first or i >= num_layers - keep_last:
            out[i] = 0.0
    return out


def read_per_layer_file(path: str) -> tuple[object, object]:
    """(MLP ratios, head ratios) from a JSON file: ``{"mlp": [...] or {"i": r}, "kv_heads": ...}``
    or a bare list (MLP ratios)."""
    try:
        with open(path, "rb") as f:
            body = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: unreadable per-layer ratio file ({e})") from None
    if isinstance(body, list):
        return body, None
    if not isinstance(body, dict) or not set(body) <= {"mlp", "kv_heads"}:
        raise FormatError(f'{path}: expected a list of ratios or {{"mlp": [...], "kv_heads": [...]}}')
    return body.get("mlp"), body.get("kv_heads")


def keep_top(scores: torch.Tensor, ratio: float, what: str) -> tuple[int, ...]:
    """Sorted indices of the ``round((1 - ratio) * n)`` highest scores (ties to the lower index);
    InvalidParameter when nothing would be kept."""
    n = scores.numel()
    kept = n - int(round(ratio * n))
    if kept <= 0:
        raise InvalidParameter(f"{what}: a ratio of {ratio} would remove every one of its {n} units; keep at least one")
    order = torch.sort(scores, descending=True, stable=True).indices[:kept]
    return tuple(sorted(int(i) for i in order))


def select(channel_scores: dict, head_scores: dict, mlp_ratios: list[float],
           head_ratios: list[float]) -> tuple[dict, dict]:
    """(channels, kv_heads): layer -> kept indices, for the layers whose ratio is above 0."""
    channels = {i: keep_top(channel_scores[i], r, f"layer {i} MLP channels") for i, r in enumerate(mlp_ratios) if r > 0}
    heads = {i: keep_top(head_scores[i], r, f"layer {i} key-value heads") for i, r in enumerate(head_ratios) if r > 0}
    return channels, heads
