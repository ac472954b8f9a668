"""Merge methods, one small object each, registered by their recipe name (``merge_method:``).

Built-ins are the modules listed in ``_BUILTIN_MODULES`` (each defines ``METHODS``, a tuple of
:class:`~.base.MergeMethod` instances); adding a method is adding a module here. Plugins register
through the ``tensorstore_llm.merge_methods`` entry-point group (each entry point loads a
MergeMethod instance) or :func:`register_method`; nothing overrides a method silently.

Example:
    >>> from tensorstore_llm.merge.methods import get_method, method_names
    >>> method_names()[:3]
    ('linear', 'slerp', 'nuslerp')
    >>> get_method("ties").preset.consensus
    'sum'
"""
from __future__ import annotations

import importlib

from ...errors import RecipeError
from .base import JobSpec, MergeInputs, MergeMethod, Param, Prepared, TensorSlot

__all__ = ["JobSpec", "MergeInputs", "MergeMethod", "Param", "Prepared", "TensorSlot", "get_method", "method_names",
           "register_method"]

_BUILTIN_MODULES = ("linear", "slerp", "nuslerp", "model_stock", "sens_merging", "mediator", "task_arithmetic", "passthrough",
                    "lore", "aim", "twin", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram")
_REGISTRY: dict[str, MergeMethod] = {}
_loaded = False


def register_method(method: MergeMethod, clobber: bool = False) -> None:
    """Add ``method`` under ``method.name``; an existing name is an error unless ``clobber``.

    Its parameters' domains are its own: another method may give the same name another domain
    (slerp's ``t`` is a fraction in [0, 1], nearswap's a distance >= 0), as mergekit does.
    """
    if not isinstance(method, MergeMethod) or not method.name:
        raise RecipeError(f"a merge method must be a named MergeMethod instance, got {method!r}")
    if method.name in _REGISTRY and not clobber and _REGISTRY[method.name] is not method:
        raise RecipeError(f"merge method {method.name!r} is already registered; pass clobber=True to replace it")
    _REGISTRY[method.name] = method


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        for method in importlib.import_module(f"{__name__}.{module}").METHODS:
            register_method(method)
    from importlib.metadata import entry_points

    for ep in entry_points(group="tensorstore_llm.merge_methods"):
        register_method(ep.load())


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``; RecipeError listing the supported ones otherwise."""
    _load()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise RecipeError(f"merge_method {name!r} is not supported; supported: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def method_names() -> tuple[str, ...]:
    """Every registered method's name, built-ins first in their documented order."""
    _load()
    return tuple(_REGISTRY)


def all_methods() -> tuple[MergeMethod, ...]:
    """Every registered method."""
    _load()
    return tuple(_REGISTRY.values())
