"""Fine-tuning memory planner: per-GPU memory of full fine-tuning, LoRA, QLoRA and LoRAM, from the
model's config alone (no weights are read).

The terms follow the seed's memory analysis of full fine-tuning (``seeds/001``): a 3B model in
fp16 holds 6 GB of weights, 6 GB of gradients and 36 GB of AdamW state (fp32 master copy, first
and second moments: 12 bytes per parameter); activations with full recomputation take
``layers · batch · seq · hidden · bytes`` (one layer input kept per layer). Without recomputation
the activations of every layer are kept; for those we use Korthikanti et al. 2022 (``Reducing
activation recomputation in large transformer models``), per layer
``seq · batch · hidden · (34 + 5 · heads · seq / hidden)`` bytes in 16-bit training, adapted to
SwiGLU MLPs and grouped-query attention below (per token and layer, in elements: attention
input, q/k/v, scores and softmax output per head, attention output, MLP input, gate, up, the
activation and its product, two norms, plus the logits of the last layer).

- full: trainable = all parameters; weights in the training dtype; gradients in the training dtype;
  optimizer: AdamW 8 bytes / trainable parameter of moments (fp32) plus a 4-byte fp32 master copy
  with 16-bit mixed precision, AdamW8bit 2 bytes of moments (+ master); ZeRO stage 1 / 2 / 3 divides
  optimizer state / + gradients / + weights by the number of GPUs.
- lora / loram: base weights frozen (no gradients or optimizer state); trainable = the LoRA factors
  r·(in + out) of each targeted linear layer (all of q, k, v, o, gate, up, down by default).
  loram: the same on the model pruned by ``prune_ratio`` (MLP channels; heads by ``head_prune_ratio``).
- qlora: base weights in NF4 (0.5 byte per parameter + one fp32 absmax per 64 ⇒ 0.5625 bytes;
  embeddings and norms stay 16-bit), LoRA factors trainable as in lora.

Activations of LoRA methods: the frozen base still stores its layer inputs for the backward pass
through the adapters, so they are counted as for full fine-tuning. The planner is checked against
measured peaks of real training steps in tests/test_planner.py and docs/benchmarks.md.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .arch import Architecture
from .errors import FormatError, InvalidParameter

METHODS = ("full", "lora", "qlora", "loram")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class PlanSettings:
    """What the estimate depends on besides the model."""

    batch: int = 1
    seq_len: int = 2048
    dtype: str = "bf16"
    optimizer: str = "adamw"
    grad_checkpointing: bool = False
    zero: int = 0
    gpus: int = 1
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    prune_ratio: float = 0.5
    head_prune_ratio: float = 0.0

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise InvalidParameter(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.optimizer not in ("adamw", "adamw8bit", "sgd"):
            raise InvalidParameter(f"--optimizer must be adamw, adamw8bit or sgd, got {self.optimizer!r}")
        if self.zero not in (0, 1, 2, 3) or self.gpus < 1 or self.batch < 1 or self.seq_len < 1 or self.lora_rank < 1:
            raise InvalidParameter("--zero must be 0-3 and --gpus, --batch, --seq-len, --rank at least 1")
        if not 0 <= self.prune_ratio < 1 or not 0 <= self.head_prune_ratio < 1:
            raise InvalidParameter("prune ratios must be in [0, 1)")


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU of each term, and the parameter counts behind them."""

    method: str
    params: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def config_of(ref: str, store=None) -> dict:
    """config.json of a directory, a config.json file, or a store artifact (no weights read)."""
    if os.path.isdir(ref):
        ref = os.path.join(ref, "config.json")
    if os.path.isfile(ref):
        try:
            with open(ref, "rb") as f:
                return json.loads(f.read())
        except ValueError as e:
            raise FormatError(f"{ref}: not JSON ({e})") from None
    if store is not None and store.has(ref):
        files = store.carried_files(ref)
        if "config.json" in files:
            return config_of(files["config.json"])
        raise FormatError(f"artifact {ref}: carries no config.json")
    from .io import hub

    parsed = hub.parse_hub_ref(ref)
    if parsed is None:
        raise FormatError(f"{ref!r} is not a directory, a config.json, an artifact or a hub id")
    path, _ = hub.snapshot(*parsed)   # from the local cache offline; only config.json is read
    return config_of(path)


def _linear_shapes(arch: Architecture, inter: int, kv: int, heads: int) -> dict[str, tuple[int, int]]:
    h, hd = arch.hidden_size, arch.head_dim
    return {"q": (heads * hd, h), "k": (kv * hd, h), "v": (kv * hd, h), "o": (h, heads * hd),
            "gate": (inter, h), "up": (inter, h), "down": (h, inter)}


def parameter_counts(arch: Architecture, inter: int | None = None, kv: int | None = None) -> dict[str, int]:
    """{"linear", "embed", "norm"} parameter counts (norms: two per layer plus the final one)."""
    inter = arch.intermediate_size if inter is None else inter
    kv = arch.num_kv_heads if kv is None else kv
    heads = kv * arch.group_size
    linear = sum(o * i for o, i in _linear_shapes(arch, inter, kv, heads).values()) * arch.num_layers
    embed = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    norm = arch.hidden_size * (2 * arch.num_layers + 1)
    return {"linear": linear, "embed": embed, "norm": norm}


def activation_bytes(arch: Architecture, s: PlanSettings, inter: int, kv: int, elem: int) -> int:
    """Activation bytes per GPU (see the module docstring)."""
    b, t, h, L = s.batch, s.seq_len, arch.hidden_size, arch.num_layers
    if s.grad_checkpointing:
        return L * b * t * h * elem + b * t * arch.vocab_size * 4     # layer inputs + fp32 logits
    heads = kv * arch.group_size
    hd = arch.head_dim
    per_token = (2 * h                                   # two norm inputs
                 + 2 * h                                 # attention input, MLP input (normed)
                 + (heads + 2 * kv) * hd                 # q, k, v
                 + heads * hd + h                        # attention output, o output
                 + 4 * inter)                            # gate, up, act(gate), act(gate)*up
    scores = 2 * heads * t                               # scores and softmax per query token
    return L * b * t * (per_token + scores) * elem + b * t * arch.vocab_size * 4


def estimate(arch: Architecture, method: str, s: PlanSettings) -> Estimate:
    """The per-GPU memory of fine-tuning ``arch`` with ``method`` under settings ``s``."""
    if method not in METHODS:
        raise InvalidParameter(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    elem = DTYPE_BYTES[s.dtype]
    inter, kv = arch.intermediate_size, arch.num_kv_heads
    if method == "loram":
        inter = max(1, inter - int(round(s.prune_ratio * inter)))
        kv = max(1, kv - int(round(s.head_prune_ratio * kv)))
    counts = parameter_counts(arch, inter, kv)
    params = sum(counts.values())
    mixed = elem == 2
    if method == "full":
        trainable = params
        weights = params * elem
        gradients = trainable * elem
        moments = {"adamw": 8, "adamw8bit": 2, "sgd": 0}[s.optimizer]
        optimizer = trainable * (moments + (4 if mixed else 0))
    else:
        shapes = _linear_shapes(arch, inter, kv, kv * arch.group_size)
        trainable = sum(s.lora_rank * (o + i) for role, (o, i) in shapes.items() if role in s.lora_targets) * arch.num_layers
        if method == "qlora":
            weights = int(counts["linear"] * 0.5625) + (counts["embed"] + counts["norm"]) * 2
        else:
            weights = params * elem
        gradients = trainable * 4                       # adapters train in fp32
        optimizer = trainable * {"adamw": 8, "adamw8bit": 2, "sgd": 0}[s.optimizer]
    gpus = s.gpus
    if s.zero >= 1:
        optimizer //= gpus
    if s.zero >= 2:
        gradients //= gpus
    if s.zero >= 3:
        weights //= gpus
    return Estimate(method, params, trainable, weights, gradients, optimizer, activation_bytes(arch, s, inter, kv, elem))


def compare(config: dict, methods, settings: PlanSettings) -> list[Estimate]:
    """Estimates of several methods for one config (a table's rows)."""
    arch = Architecture.from_config(config)
    return [estimate(arch, m, settings) for m in methods]


def table(estimates: list[Estimate]) -> str:
    """A text table comparing methods, sizes in GiB."""
    gib = 1024 ** 3
    lines = [f"{'method':8} {'params':>9} {'trainable':>11} {'weights':>9} {'grads':>9} {'optim':>9} {'activ':>9} {'total':>9}"]
    for e in estimates:
        lines.append(f"{e.method:8} {e.params / 1e6:>8.1f}M {e.trainable / 1e6:>10.2f}M {e.weights / gib:>8.2f}G "
                     f"{e.gradients / gib:>8.2f}G {e.optimizer / gib:>8.2f}G {e.activations / gib:>8.2f}G {e.total / gib:>8.2f}G")
    return "\n".join(lines)


__all__ = ["Estimate", "PlanSettings", "compare", "config_of", "estimate", "parameter_counts", "table"]
