"""The model card of a LoRA merge's Hugging Face directory (``tsllm lora merge -o`` and
``tsllm export`` of a merged artifact): what was merged into what, how, and the adapter's
shape, so the provenance is not lost when the directory is uploaded.

Built from the merge's lineage (parents) and recipe record only, never from the tensors, so the
one-write ``-o`` path and the export of a stored merge carry the same card. Local paths appear
as their last component (a card is meant to be published).
"""
from __future__ import annotations

import os

import yaml

CARD_NAME = "README.md"


def _origin(parent: dict) -> str:
    """Where an input came from: a store artifact id, a hub repo at a commit, or a local name."""
    if "id" in parent:
        return f"store artifact `{parent['id'][:12]}`"
    external = parent.get("external", {})
    kind = external.get("type", "input")
    if kind == "hub":
        return f"hub `{external.get('repo')}` at `{str(external.get('commit') or external.get('revision'))[:12]}`"
    path = external.get("path")
    return f"{kind} `{os.path.basename(os.path.normpath(path))}`" if path else kind


def _ranks(ranks: dict) -> str:
    values = sorted(set(ranks.values()))
    if not values:
        return "none"
    return f"r={values[0]}" if len(values) == 1 else f"r={values[0]}..{values[-1]}"


def _module_kinds(ranks: dict) -> str:
    """The targeted module names without their layer prefixes (q_proj, down_proj, ...)."""
    return ", ".join(f"`{k}`" for k in sorted({name.rsplit(".", 1)[-1] for name in ranks}))


def lora_merge_card(recipe: dict, parents: list[dict]) -> str:
    """A model card (Markdown with Hugging Face front matter) for a LoRA merge whose artifact
    recipe record is ``recipe`` (``{"op": "lora_merge", "scale", "adapter": describe(), ...}``).

    Example:
        >>> card = lora_merge_card({"op": "lora_merge", "scale": 1.0, "adapter": {"ranks": {"l.q_proj": 8}}},
        ...                        [{"role": "base", "id": "ab" * 32}, {"role": "adapter", "id": "cd" * 32}])
        >>> "store artifact `cdcdcdcdcdcd`" in card and "r=8" in card
        True
    """
    from .. import __version__

    adapter = recipe.get("adapter") or {}
    ranks = adapter.get("ranks") or {}
    hub_models = [p["external"]["repo"] for p in parents if p.get("external", {}).get("type") == "hub"]
    front = {"library_name": "transformers", "tags": ["merge", "lora", "tensorstore_llm"]}
    if hub_models:
        front["base_model"] = hub_models
    update = "m·(W + s·B·A)/‖W + s·B·A‖ (DoRA)" if adapter.get("dora") else "W + s·B·A"
    scale = recipe.get("scale", 1.0)
    scaling = ("lora_alpha/√r, rsLoRA" if adapter.get("use_rslora")
               else "per module, rank_pattern / alpha_pattern honoured")
    how = [f"This model is a base model with a LoRA adapter merged into its weights, made with tensorstore_llm "
           f"{__version__} (`tsllm lora merge`): every targeted weight is {update}, with s = lora_alpha/r "
           f"({scaling})"
           + (f" times `--scale {scale:g}`" if scale != 1.0 else "")
           + ", computed in fp32 and rounded once to the base's dtype (PEFT's `merge_and_unload()` result)."]
    if recipe.get("base_quant"):
        how.append(f"QLoRA: merged into dequant({recipe['base_quant'].upper()}(W)), the weights the adapter was "
                   "trained against" + (f", then requantised to {recipe['requantize'].upper()}"
                                        if recipe.get("requantize") else "") + ".")
    transfer = recipe.get("transfer")
    if transfer:
        how.append(f"The adapter was made for another base; it was merged here with `--transfer` "
                   f"({len(transfer.get('mismatched') or [])} of the base tensors it depends on differ).")
    rows = [("PEFT type", adapter.get("peft_type", "LORA") + (" (DoRA)" if adapter.get("dora") else "")),
            ("rank", f"{_ranks(ranks)} on {len(ranks)} modules"),
            ("target modules", _module_kinds(ranks) or "none"),
            ("rsLoRA", "yes" if adapter.get("use_rslora") else "no"),
            ("embedding LoRA", ", ".join(f"`{m}`" for m in adapter.get("embedding_modules") or []) or "none"),
            ("modules_to_save", ", ".join(f"`{m}`" for m in adapter.get("modules_to_save") or []) or "none"),
            ("adapter parameters", f"{adapter['num_params']:,}" if isinstance(adapter.get("num_params"), int) else "?")]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", "# Merged model (base + LoRA)", "",
             *[p + "\n" for p in how], "## Inputs", "",
             *[f"- {p.get('role', 'input')}: {_origin(p)}" for p in parents], "", "## Adapter", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    return "\n".join(lines)


def lora_merge_files(recipe: dict, parents: list[dict]) -> dict[str, bytes]:
    """``README.md`` (the model card) for a LoRA merge's directory; {} for any other recipe.

    Example:
        >>> lora_merge_files({"op": "merge"}, [])
        {}
    """
    if not isinstance(recipe, dict) or recipe.get("op") != "lora_merge":
        return {}
    return {CARD_NAME: lora_merge_card(recipe, parents).encode()}
