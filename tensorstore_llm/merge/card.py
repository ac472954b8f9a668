"""What a merged Hugging Face directory carries besides its weights: the recipe as
``mergekit_config.yml`` (mergekit's name for it, so hub tooling and ``mergekit-yaml`` read it) and a
model card (``README.md``) naming the inputs, the method and the tool version, so the recipe is
not lost when the directory is uploaded. Also the recipe keys that shape those files:
``chat_template`` (checked to parse, written into ``tokenizer_config.json``); the ``tokenizer:``
block is read by ``merge/tokenizer.py``.
"""
from __future__ import annotations

from typing import Any

import yaml

from ..errors import RecipeError
from .safe_yaml import short

CONFIG_NAME = "mergekit_config.yml"
CARD_NAME = "README.md"


def recipe_yaml(raw: dict) -> str:
    """The recipe ``raw`` (the parsed mergekit YAML) as YAML text, keys in the recipe's order."""
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def _input_line(parent: dict) -> str:
    ref = parent.get("ref", "?")
    if "id" in parent:
        origin = f"store artifact {parent['id'][:12]}"
    else:
        external = parent.get("external", {})
        origin = {"hub": lambda e: f"hub {e.get('repo')}@{str(e.get('commit') or e.get('revision'))[:12]}"}.get(
            external.get("type"), lambda e: external.get("type", "input"))(external)
    return f"- `{ref}` ({parent.get('role', 'model')}; {origin})"


def model_card(raw: dict, method: str, parents: list[dict], arithmetic: str = "fp32") -> str:
    """A model card (Markdown with Hugging Face front matter): the merge method, every input with
    its role and origin, the tool and version, and the recipe itself."""
    from .. import __version__

    hub_models = [p["external"]["repo"] for p in parents if p.get("external", {}).get("type") == "hub"]
    front = {"library_name": "transformers", "tags": ["merge", "tensorstore_llm", method]}
    if hub_models:
        front["base_model"] = hub_models
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", "# Merged model", "",
             f"This model is a merge made with tensorstore_llm {__version__} (`tsllm merge`), "
             f"method `{method}`" + (f", arithmetic `{arithmetic}`" if arithmetic != "fp32" else "") + ".", "",
             "## Inputs", "", *[_input_line(p) for p in parents], "",
             "## Recipe", "", f"The recipe, also in `{CONFIG_NAME}`:", "", "```yaml", recipe_yaml(raw).rstrip(), "```", ""]
    return "\n".join(lines)


def merge_files(recipe_record: dict, parents: list[dict]) -> dict[str, bytes]:
    """``mergekit_config.yml`` and ``README.md`` for a merge whose artifact recipe record is
    ``recipe_record`` ({"op": "merge", "merge_method", "recipe", ...}); a LoRA merge's model card
    (``lora.card``) for {"op": "lora_merge", ...}; {} for anything else."""
    if isinstance(recipe_record, dict) and recipe_record.get("op") == "lora_merge":
        from ..lora.card import lora_merge_files

        return lora_merge_files(recipe_record, parents)
    if not isinstance(recipe_record, dict) or recipe_record.get("op") != "merge" or "recipe" not in recipe_record:
        return {}
    raw, method = recipe_record["recipe"], recipe_record.get("merge_method", "?")
    card = model_card(raw, method, parents, recipe_record.get("arithmetic", "fp32"))
    return {CONFIG_NAME: recipe_yaml(raw).encode(), CARD_NAME: card.encode()}


def with_chat_template(files: dict, template: str | None, inputs_files: list[dict], where: str) -> dict:
    """Carried ``files`` with ``tokenizer_config.json``'s ``chat_template`` set as the recipe's
    ``chat_template`` says: a Jinja template as given, ``auto`` the template most of the inputs
    have (the first in recipe order on a tie, as mergekit counts). ``files`` unchanged for None."""
    import json

    from ..errors import RecipeError

    if template is None:
        return files
    name = "tokenizer_config.json"
    if name not in files:
        raise RecipeError(f"{where}: chat_template needs the output's {name}, but the base model carries none")

    def config_of(entry) -> dict:
        try:
            if isinstance(entry, bytes):
                data = entry
            else:
                with open(entry, "rb") as f:
                    data = f.read()
            config = json.loads(data)
        except (OSError, ValueError) as e:
            raise RecipeError(f"{where}: chat_template: cannot read {name}: {e}") from None
        return config if isinstance(config, dict) else {}

    if template == "auto":
        found = [config_of(f[name]).get("chat_template") for f in inputs_files if name in f]
        found = [t for t in found if isinstance(t, str) and t]
        if not found:
            raise RecipeError(f"{where}: chat_template: auto, but no input model has a chat template")
        template = max(found, key=found.count)   # max keeps the first of equal counts
    config = config_of(files[name])
    config["chat_template"] = template
    return {**files, name: json.dumps(config, indent=2, ensure_ascii=False).encode()}


def parse_chat_template(value: Any, where: str) -> str | None:
    """``chat_template``: a Jinja template (must parse) or ``auto``; named templates are refused."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: chat_template must be a Jinja template or 'auto', got {short(value)}")
    if value == "auto":
        return value
    if "{{" not in value and "{%" not in value:
        raise RecipeError(f"{where}: chat_template {short(value)} is a template name (mergekit's bundled "
                          f"templates are not included); give the Jinja template text or 'auto'")
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise RecipeError(f"{where}: chat_template needs jinja2 to be checked (pip install jinja2)") from None
    try:
        ImmutableSandboxedEnvironment().parse(value)
    except jinja2.TemplateSyntaxError as e:
        raise RecipeError(f"{where}: chat_template does not parse: {e.message} (line {e.lineno})") from None
    return value
