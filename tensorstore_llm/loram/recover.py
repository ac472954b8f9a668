"""LoRAM recovery (arXiv 2502.13533): a LoRA trained on a pruned model, expanded to the full model.

For a structured plan, the factors of each targeted module are padded with zeros where the plan
removed units:

- q / k / v / gate / up: ``lora_B`` (out x r) gets zero rows at the pruned output indices (and a
  ``lora_bias`` zero entries there);
- o / down: ``lora_A`` (r x in) gets zero columns at the pruned input indices;
- every other factor (their ``lora_A`` / ``lora_B``, embeddings, ``modules_to_save``) is unchanged.

So ``B^R·A^R`` is exactly zero in the pruned rows / columns and equals the pruned ``B·A``
elsewhere; merged into the full model it leaves the pruned units' weights as they were. Plans with
masks (unstructured, n:m) keep shapes, so their adapters need no reshaping. An adapter trained on
an aligned (continued pre-trained) pruned checkpoint has the same shapes and recovers the same way.
DoRA adapters are refused: their magnitude vector has no value for the pruned rows.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..errors import RecipeError, ShapeMismatch
from ..lora.peft_format import LoraAdapter, peft_key
from ..prune.plan import PRUNED_ROLES, PruningPlan


@dataclass
class Recovery:
    """The recovered adapter and, per module, what was done (expanded rows / columns, unchanged)."""

    adapter: LoraAdapter
    actions: dict[str, str] = field(default_factory=dict)


def _expand(t: torch.Tensor, index: list[int], width: int, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = width
    out = torch.zeros(shape, dtype=t.dtype)
    out.index_copy_(dim, torch.tensor(index, dtype=torch.long), t)
    return out


def recover(adapter: LoraAdapter, plan: PruningPlan) -> Recovery:
    """Expand ``adapter`` (trained on the model pruned by ``plan``) to the full model's shapes.

    Raises ShapeMismatch naming the adapter file and key when a module's factors fit neither the
    pruned nor the full model, RecipeError for DoRA or fan_in_fan_out adapters on pruned modules.

    Example:
        >>> recovered = recover(read_adapter("pruned-lora"), plan).adapter   # doctest: +SKIP
    """
    arch = plan.arch
    out = copy.deepcopy(adapter)
    actions = {}
    src = adapter.source or "adapter"
    for name, m in out.modules.items():
        role = arch.role(m.weight_name)
        if m.kind != "linear" or role.role not in PRUNED_ROLES or role.layer is None:
            actions[name] = "unchanged"
            continue
        axis = role.axis
        kept = plan.rows(role.role, role.layer) if plan.structure == "structured" else None
        width = plan.full_width(role.role)
        other = arch.hidden_size          # q/k/v/gate/up read the hidden state; o/down write it
        pruned_width = len(kept) if kept is not None else width
        got = m.B.shape[0] if axis == 0 else m.A.shape[1]
        side = m.A.shape[1] if axis == 0 else m.B.shape[0]
        if side != other or got not in (pruned_width, width):
            raise ShapeMismatch(f"{src}: {peft_key(name, 'A')} {tuple(m.A.shape)} / {peft_key(name, 'B')} "
                                f"{tuple(m.B.shape)} fit neither the pruned model ({role.role} with {pruned_width} "
                                f"{'outputs' if axis == 0 else 'inputs'}) nor the full one ({width}), both with "
                                f"{other} {'inputs' if axis == 0 else 'outputs'}")
        if got == width:
            actions[name] = "unchanged (already full size)"
            continue
        if m.magnitude is not None:
            raise RecipeError(f"{src}: module {name!r} is a DoRA module; its magnitude has no value for the pruned "
                              "rows, so it cannot be recovered (train a plain LoRA for LoRAM)")
        if m.fan_in_fan_out:
            raise RecipeError(f"{src}: module {name!r} uses fan_in_fan_out, which Llama-style models do not")
        if axis == 0:
            m.B = _expand(m.B, kept, width, 0)                        # out x r: zero rows at pruned outputs
            if m.bias is not None:
                m.bias = _expand(m.bias, kept, width, 0)
            actions[name] = f"lora_B rows {pruned_width} -> {width}"
        else:
            m.A = _expand(m.A, kept, width, 1)                        # r x in: zero columns at pruned inputs
            actions[name] = f"lora_A columns {pruned_width} -> {width}"
    return Recovery(out, actions)


def full_shapes(plan: PruningPlan, names) -> dict[str, tuple[int, int]]:
    """The full model's shapes of the prunable weights ``names`` (for checking an adapter)."""
    out = {}
    a = plan.arch
    for n in names:
        role = a.role(n)
        if role.role in PRUNED_ROLES and role.kind == "weight" and role.layer is not None:
            width = plan.full_width(role.role)
            out[n] = (width, a.hidden_size) if role.axis == 0 else (a.hidden_size, width)
    return out
