"""tensorstore_llm: an offline artifact store and streaming tensor processor for LLM weights.

The public API, re-exported flat. Attributes load on first use so that importing the package
(and ``tsllm --help``) stays fast and does not pull in torch.

Example:
    >>> import tensorstore_llm as ts                                  # doctest: +SKIP
    >>> store = ts.open_store("tsllm-store")
    >>> base = ts.import_checkpoint("path/to/hf-model", store, name="base")
    >>> ts.export(store, "base", "out/")
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "open_store": "api", "import_checkpoint": "api", "export": "api", "convert": "api",
    "weighted_sum": "api", "merge": "api", "run_plan": "api", "JobResult": "api", "lora_merge": "api",
    "Store": "store", "Artifact": "store", "Manifest": "store",
    "Executor": "engine", "Plan": "engine", "TensorJob": "engine", "InputRef": "engine", "plan_map": "engine",
    "HFCheckpointSource": "io", "HFCheckpointSink": "io", "TensorMeta": "io",
    "op": "ops", "register_op": "ops", "get_op": "ops", "list_ops": "ops",
    "seed_for": "seeding",
    "greedy_soup": "api", "command_score": "merge.soup", "RunOptions": "engine.options",
}
_ERRORS = ("TsllmError", "ArtifactNotFound", "RefError", "FormatError", "UnsafeFormat", "IntegrityError",
           "TensorNotFound", "ShapeMismatch", "DTypeError", "InvalidTensorName", "RecipeError", "StorageError",
           "OutputExists")
__all__ = sorted([*_EXPORTS, *_ERRORS, "__version__"])


def __getattr__(name: str):
    if name in _ERRORS:
        return getattr(importlib.import_module(".errors", __name__), name)
    if name in _EXPORTS:
        return getattr(importlib.import_module("." + _EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'tensorstore_llm' has no attribute {name!r}")


class _CallableSubpackage(types.ModuleType):
    """A subpackage named like a function of the flat API (``merge``): calling it calls that function,
    so ``ts.merge(store, recipe)`` works before and after ``tensorstore_llm.merge`` is imported."""

    def __call__(self, *args, **kwargs):
        api = importlib.import_module(".api", __name__)
        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    """The package module. Importing a subpackage sets it as an attribute of the package, which
    would hide the API function of the same name (``ts.merge`` became the ``merge`` package, not
    callable); such a subpackage is made callable instead."""

    def __setattr__(self, name: str, value) -> None:
        if _EXPORTS.get(name) == "api" and type(value) is types.ModuleType:
            value.__class__ = _CallableSubpackage
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
