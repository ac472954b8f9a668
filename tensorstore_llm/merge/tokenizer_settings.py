"""mergekit's tokenizer settings in a recipe, read and checked: ``tokenizer_source`` (``base``,
``union`` or a model of the recipe) or the ``tokenizer:`` block (``source``, default ``union`` as
in mergekit; ``tokens`` with a per-token ``source`` / ``force``; ``pad_to_multiple_of``).

Only parsing lives here (no tokenizer is loaded): ``merge/tokenizer.py`` builds the output
vocabulary from a :class:`TokenizerSpec` and re-exports these names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import RecipeError, TokenizerError
from .safe_yaml import short


@dataclass(frozen=True)
class TokenSource:
    """Where a ``tokens:`` entry takes its row: ``kind`` zero, model (that model's row of the
    token) or model_token (``model``'s row of ``token`` or of ``token_id``)."""

    kind: str
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenRule:
    source: TokenSource | None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """The recipe's tokenizer settings: ``source`` is base, union or a model reference."""

    source: str
    tokens: dict = field(default_factory=dict)          # token string -> TokenRule, in recipe order
    pad_to_multiple_of: int | None = None


def parse_tokenizer_settings(raw: dict, refs: list[str], where: str) -> TokenizerSpec | None:
    """``tokenizer_source`` or the ``tokenizer:`` block of recipe ``raw`` (a mapping), checked
    against the recipe's model references ``refs``; None when neither is given.

    Example:
        >>> parse_tokenizer_settings({"tokenizer_source": "union"}, ["a", "b"], "r.yaml").source
        'union'
    """
    source, block = raw.get("tokenizer_source"), raw.get("tokenizer")
    if source is not None and block is not None:
        raise RecipeError(f"{where}: give tokenizer_source or a tokenizer: block, not both (as mergekit)")
    if source is None and block is None:
        return None
    tokens, pad = {}, None
    if block is not None:
        if not isinstance(block, dict):
            raise RecipeError(f"{where}: tokenizer must be a mapping (source, tokens, pad_to_multiple_of), got {short(block)}")
        unknown = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"})
        if unknown:
            raise RecipeError(f"{where}: tokenizer has unknown key(s) {unknown}; mergekit's are source, tokens, pad_to_multiple_of")
        source = block.get("source") if block.get("source") is not None else "union"
        tokens = _parse_tokens(block.get("tokens"), refs, f"{where}: tokenizer.tokens")
        pad = block.get("pad_to_multiple_of")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
            raise RecipeError(f"{where}: tokenizer.pad_to_multiple_of must be a positive integer, got {short(pad)}")
    key = "tokenizer.source" if block is not None else "tokenizer_source"
    if not isinstance(source, str) or not source:
        raise RecipeError(f"{where}: {key} must be base, union or a model of the recipe, got {short(source)}")
    if source not in ("base", "union") and source not in refs:
        raise RecipeError(f"{where}: {key} {source!r} is not a model of this recipe ({', '.join(refs)}); "
                          f"give base, union or one of them")
    return TokenizerSpec(source, tokens, pad)


def _parse_tokens(value: Any, refs: list[str], where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{where} must map token strings to {{source, force}}, got {short(value)}")
    rules = {}
    for token, entry in value.items():
        here = f"{where}[{token!r}]"
        if not isinstance(token, str) or not token:
            raise RecipeError(f"{where}: a token must be a non-empty string, got {short(token)}")
        entry = {} if entry is None else entry
        if not isinstance(entry, dict) or set(entry) - {"source", "force"}:
            raise RecipeError(f"{here} must be a mapping with source and / or force, got {short(entry)}")
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"{here}.force must be true or false, got {short(force)}")
        rules[token] = TokenRule(_token_source(entry.get("source"), refs, f"{here}.source"), force)
    return rules


def _token_source(value: Any, refs: list[str], where: str) -> TokenSource | None:
    if value is None:
        return None
    if isinstance(value, str):
        _check_model(value, refs, where)
        return TokenSource("model", value)
    if not isinstance(value, dict) or value.get("kind") not in ("zero", "model_token"):
        raise RecipeError(f"{where} must be a model, {{kind: zero}} or {{kind: model_token, model, token | token_id}}, "
                          f"got {short(value)}")
    if value["kind"] == "zero":
        if set(value) != {"kind"}:
            raise RecipeError(f"{where}: kind zero takes no other keys, got {short(value)}")
        return TokenSource("zero")
    if set(value) - {"kind", "model", "token", "token_id"} or "model" not in value:
        raise RecipeError(f"{where}: kind model_token takes model and one of token / token_id, got {short(value)}")
    model, token, token_id = str(value["model"]), value.get("token"), value.get("token_id")
    _check_model(model, refs, where)
    if (token is None) == (token_id is None):
        raise RecipeError(f"{where}: give exactly one of token and token_id, got {short(value)}")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise RecipeError(f"{where}.token_id must be a non-negative integer, got {short(token_id)}")
    if token is not None and not isinstance(token, str):
        raise RecipeError(f"{where}.token must be a string, got {short(token)}")
    return TokenSource("model_token", model, token, token_id)


def _check_model(ref: str, refs: list[str], where: str) -> None:
    if ref not in refs:
        raise TokenizerError(f"{where}: model {ref!r} is not in the recipe ({', '.join(refs)})")
