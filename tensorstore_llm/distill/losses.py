"""Distillation losses against stored sparse targets, and the dense full-KD reference.

All losses take the student's logits [B, L, V] and compare its full-vocabulary softmax at
temperature T with a target per position. Target p belongs to the student's logits at position p
(the distribution of token p + 1). KD terms are multiplied by T² (Hinton et al.) so that their
gradient scale does not shrink with T. Reductions are means over positions that have a target.

- ``sparse_kd_loss``: forward KL (or cross-entropy, same gradient) of the student against t̂ over
  the stored ids. With RS-KD targets (E[t̂] = t) its expected gradient equals full KD's.
- ``topk_kd_loss``: the top-k baseline, "ignore-tail" (renormalise the k probabilities) or
  "tail-bucket" (a (k+1)-th outcome holding the teacher's remaining mass against the student's).
- ``hard_ce_loss``: next-token cross-entropy with the labels (Hugging Face convention: shifted here).
- ``distill_loss``: α · KD + (1 − α) · CE on a batch from ``distill.dataset``.
- ``dense_kd_loss``: KL(teacher ‖ student) over the whole vocabulary (the reference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KD_KINDS = ("kl", "ce")
TOPK_MODES = ("ignore-tail", "tail-bucket")


def _positions(mask: torch.Tensor, position_mask: torch.Tensor | None) -> torch.Tensor:
    valid = mask.any(dim=-1)
    return valid if position_mask is None else valid & position_mask.bool()


def _mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return (values * valid).sum() / valid.sum().clamp_min(1)


def sparse_kd_loss(student_logits: torch.Tensor, target_ids: torch.Tensor, target_weights: torch.Tensor,
                   target_mask: torch.Tensor, *, temperature: float = 1.0, kind: str = "kl",
                   position_mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² · mean over positions of Σ_k w_k (log w_k − log s_k) ('kl') or −Σ_k w_k log s_k ('ce').

    Args:
        student_logits: [B, L, V]; s = softmax(student_logits / T) over the full vocabulary.
        target_ids / target_weights / target_mask: [B, L, K] from ``collate_sparse``.
        temperature: T (use the T the targets were made with).
        kind: 'kl' (0 when the student equals t̂ on its support) or 'ce'; same gradient.
        position_mask: optional [B, L] bool, positions to train on.
    Returns:
        A scalar tensor.

    Example:
        >>> logits = torch.zeros(1, 1, 4, requires_grad=True)
        >>> ids = torch.tensor([[[0, 1]]]); w = torch.tensor([[[0.5, 0.5]]]); m = torch.ones(1, 1, 2, dtype=torch.bool)
        >>> round(float(sparse_kd_loss(logits, ids, w, m, kind="ce")), 4)   # -log(1/4)
        1.3863
    """
    if kind not in KD_KINDS:
        raise ValueError(f"kind must be one of {KD_KINDS}, got {kind!r}")
    logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    picked = torch.gather(logp, -1, target_ids.long())                   # [B, L, K]
    w = target_weights.float() * target_mask
    per_position = -(w * picked).sum(-1)
    if kind == "kl":
        per_position = per_position + torch.xlogy(w, w).sum(-1)
    return temperature ** 2 * _mean(per_position, _positions(target_mask, position_mask))


def topk_kd_loss(student_logits: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor,
                 target_mask: torch.Tensor, *, mode: str = "ignore-tail", temperature: float = 1.0,
                 position_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k KD baseline (cross-entropy form), T² scaled, mean over positions.

    'ignore-tail': target p̃ = p / Σ_k p over the k ids; loss −Σ_k p̃_k log s_k.
    'tail-bucket': loss −Σ_k p_k log s_k − (1 − Σ_k p_k) log(1 − Σ_k s_k).
    """
    if mode not in TOPK_MODES:
        raise ValueError(f"mode must be one of {TOPK_MODES}, got {mode!r}")
    logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    picked = torch.gather(logp, -1, target_ids.long())
    p = target_probs.float() * target_mask
    head = p.sum(-1)
    if mode == "ignore-tail":
        per_position = -((p / head.clamp_min(1e-12).unsqueeze(-1)) * picked).sum(-1)
    else:
        s_head = torch.logsumexp(picked.masked_fill(~target_mask, float("-inf")), dim=-1)   # log Σ_k s_k
        log_tail = torch.log1p(-s_head.exp().clamp(max=1 - 1e-6))
        per_position = -(p * picked).sum(-1) - (1 - head).clamp_min(0) * log_tail
    return temperature ** 2 * _mean(per_position, _positions(target_mask, position_mask))


def hard_ce_loss(student_logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy: logits[:, p] against labels[:, p + 1] (labels unshifted, HF style)."""
    logits = student_logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=ignore_index)


def distill_loss(student_logits: torch.Tensor, batch: dict, *, alpha: float = 0.5, temperature: float = 1.0,
                 kind: str = "kl") -> torch.Tensor:
    """α · sparse_kd_loss + (1 − α) · hard_ce_loss on a batch from ``collate_sparse``.

    α = 1 is pure distillation, α = 0 plain language-model training on the labels.
    """
    kd = sparse_kd_loss(student_logits, batch["target_ids"], batch["target_weights"], batch["target_mask"],
                        temperature=temperature, kind=kind) if alpha else 0.0
    ce = hard_ce_loss(student_logits, batch["labels"]) if alpha < 1 else 0.0
    return alpha * kd + (1 - alpha) * ce


def dense_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
                  position_mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² · mean over positions of KL(softmax(teacher / T) ‖ softmax(student / T)), full vocabulary."""
    logs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    logt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (logt.exp() * (logt - logs)).sum(-1)
    valid = (torch.ones(per_position.shape, dtype=torch.bool, device=per_position.device) if position_mask is None
             else position_mask.bool())
    return temperature ** 2 * _mean(per_position, valid)
