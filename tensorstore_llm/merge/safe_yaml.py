"""Reading untrusted YAML (recipes, sensitivity-score files) into plain data, safely.

A safe YAML loader that refuses anchors and aliases (no expansion bombs), tags that build
anything but plain data, documents over ``MAX_RECIPE_BYTES`` and nesting deeper than
``MAX_DEPTH``; NaN and infinities are refused anywhere.
"""
from __future__ import annotations

import math
from typing import Any

import yaml

from ..errors import RecipeError

MAX_RECIPE_BYTES = 1 << 20   # real recipes are a few KB; per-layer gradient lists stay far below this
MAX_DEPTH = 24               # a recipe's deepest legitimate path is about 9 levels
_PLAIN = (str, int, float, bool, type(None))


class _Refused(yaml.YAMLError):
    """Raised by the recipe loader while composing; becomes a RecipeError."""


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, stricter for untrusted recipes: anchors and aliases are refused
    before anything is expanded, and nesting deeper than ``max_depth`` stops the composer (which
    is recursive) long before Python's stack limit. Dates stay strings (no timestamp resolver).
    """

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream, max_depth: int = MAX_DEPTH):
        super().__init__(stream)
        self._depth = 0
        self._max_depth = max_depth

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1 if event.start_mark else "?"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(f"line {line}: YAML anchors and aliases (&name / *name) are not allowed in recipes")
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                raise _Refused(f"line {line}: nested deeper than {self._max_depth} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def safe_yaml(text: str | bytes, where: str, max_bytes: int = MAX_RECIPE_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse untrusted YAML (a recipe, a scores file) into plain data, or raise RecipeError.

    Refuses: more than ``max_bytes``, anchors / aliases, nesting over ``max_depth``, tags that
    build anything but mappings with string keys, lists, strings, numbers, booleans and null,
    and NaN or infinite numbers anywhere.
    """
    if isinstance(text, bytes):
        if len(text) > max_bytes:
            raise RecipeError(f"{where}: {len(text)} bytes is over the limit of {max_bytes} bytes")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(f"{where}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(text, str):
        raise RecipeError(f"{where}: expected YAML text, got {type(text).__name__}")
    if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise RecipeError(f"{where}: {len(text.encode('utf-8', 'surrogatepass'))} bytes is over the limit of {max_bytes} bytes")
    loader = None
    try:
        loader = RecipeLoader(text, max_depth)   # its reader already refuses unprintable characters
        data = loader.get_single_data()
    except _Refused as e:
        raise RecipeError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML ({_first_line(e)})") from None
    except (ValueError, OverflowError, UnicodeError) as e:  # e.g. an integer of more than 4300 digits
        raise RecipeError(f"{where}: not valid YAML ({_first_line(e)})") from None
    finally:
        if loader is not None:
            loader.dispose()
    _check_plain(data, where, "")
    return data


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:200]


def _check_plain(node: Any, where: str, path: str) -> None:
    """Only plain data: string-keyed mappings, lists, strings, finite numbers, booleans, null."""
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                raise RecipeError(f"{where}: key {key!r}{_at(path)} is not a string")
            name = key if key.isidentifier() else repr(key)   # a key with a newline stays on one line
            _check_plain(value, where, f"{path}.{name}" if path else name)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_plain(value, where, f"{path}[{i}]")
    elif isinstance(node, float):
        if not math.isfinite(node):
            raise RecipeError(f"{where}: {path or 'the document'} is {node!r}; NaN and infinities are not allowed")
    elif not isinstance(node, _PLAIN):
        raise RecipeError(f"{where}: {path or 'the document'} is a {type(node).__name__}; recipes hold only "
                          f"mappings, lists, strings, numbers, booleans and null")


def _at(path: str) -> str:
    return f" under {path}" if path else ""


def read_recipe_file(path: str) -> str:
    """The text of recipe file ``path``, refusing files over MAX_RECIPE_BYTES without reading them whole."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: over the {MAX_RECIPE_BYTES}-byte limit for recipes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start})") from None


def short(value: Any) -> str:
    """``repr(value)``, cut to 60 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
