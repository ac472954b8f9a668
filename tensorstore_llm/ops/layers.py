"""Layer-level merge analysis: layer keys, sign-conflict ratios (Mediator) and sensitivity
softmax weights (Sens-Merging). Pure functions over tensors and numbers; no storage here.

- Mediator (Lai et al. 2025, "Mediator: Memory-efficient LLM Merging with Less Parameter
  Conflicts and Uncertainty Based Routing"): the conflict ratio of a layer is the fraction of its
  parameters where two task vectors have opposite signs (mean over pairs for more than two);
  the ratios of all layers are fitted with a Gaussian N(mu, sigma^2), and layers with a ratio
  below mu + k*sigma are averaged while the others are kept from one expert.
- Sens-Merging (Liu et al. 2025, "Sens-Merging: Sensitivity-Guided Parameter Balancing for
  Merging Large Language Models"): per-layer sensitivity scores of each task model, normalised
  across models by a softmax with temperature T, scale each model's task vector in that layer.
"""
from __future__ import annotations

import math
import re

import torch

from ..errors import InvalidParameter

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
LM_HEAD_NAMES = ("lm_head", "model.norm", "norm.weight", "final_layernorm")


def layer_key(name: str) -> str:
    """'3' for tensors of layer 3, 'embed' for those before the layers, 'final' after them."""
    match = LAYER_RE.search(name)
    if match:
        return match.group(1)
    return "final" if any(name.startswith(p) or p in name for p in LM_HEAD_NAMES) else "embed"


def conflict_counts(base: torch.Tensor, models: list[torch.Tensor]) -> tuple[int, int]:
    """(pairwise opposite-sign count summed over model pairs, pairs x elements) for one block."""
    signs = [torch.sign(m - base) for m in models]
    conflicts, pairs = 0, 0
    for i in range(len(signs)):
        for j in range(i + 1, len(signs)):
            conflicts += int(((signs[i] * signs[j]) < 0).sum())
            pairs += 1
    return conflicts, pairs * base.numel()


def gaussian_threshold(ratios: list[float], k: float) -> tuple[float, float, float]:
    """(mu, sigma, mu + k*sigma) of the layers' conflict ratios (population standard deviation)."""
    if not ratios:
        raise InvalidParameter("mediator: the models have no tensor with entries whose sign conflicts could be measured")
    mu = sum(ratios) / len(ratios)
    sigma = math.sqrt(sum((r - mu) ** 2 for r in ratios) / len(ratios))
    return mu, sigma, mu + k * sigma


def sensitivity_weights(scores: dict[str, dict[str, float]], models: list[str], key: str, temperature: float) -> list[float]:
    """Softmax over models of their sensitivity score for layer ``key`` (uniform if none is given)."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise InvalidParameter(f"sens_merging temperature must be a finite number > 0, got {temperature!r}")
    values = [scores.get(m, {}).get(key) for m in models]
    if any(v is None for v in values):
        return [1.0 / len(models)] * len(models)
    top = max(values)
    exps = [math.exp((v - top) / temperature) for v in values]
    return [e / sum(exps) for e in exps]
