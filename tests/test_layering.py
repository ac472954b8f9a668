"""House rules read from the source (no imports): one-way stairs, specific errors, no hidden
thread pools.

- Nothing inside the package imports the facade ``tensorstore_llm.api`` (domain packages use
  ``tensorstore_llm.runs``); only the CLI and the lazy top-level ``__init__`` sit above it.
- No ``raise TsllmError(...)``: every error is a specific subclass, so its exit code says what
  went wrong.
- No thread pool or thread is made at module scope: pools belong to the objects that use them.
"""
from __future__ import annotations

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tensorstore_llm")
FACADE_USERS = {"__init__.py", "quickstart.py"}   # the lazy re-export and the demo driver sit above the facade


def _modules():
    for root, _dirs, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    yield os.path.relpath(path, PACKAGE), ast.parse(f.read(), path)


def _imports_facade(node: ast.AST, module: str) -> bool:
    if isinstance(node, ast.ImportFrom):
        target = node.module or ""
        if node.level == 0:
            return target == "tensorstore_llm.api" or (target == "tensorstore_llm" and any(a.name == "api" for a in node.names))
        depth = module.count(os.sep)   # how many packages deep the module sits
        if node.level == depth + 1:     # relative import that lands on the package root
            return target == "api" or (target == "" and any(a.name == "api" for a in node.names))
    if isinstance(node, ast.Import):
        return any(a.name == "tensorstore_llm.api" for a in node.names)
    return False


def test_no_module_inside_the_package_imports_the_api_facade():
    offenders = [f"{module}:{node.lineno}" for module, tree in _modules() if module not in FACADE_USERS
                 for node in ast.walk(tree) if _imports_facade(node, module)]
    assert not offenders, f"import tensorstore_llm.runs (or the module itself) instead of the api facade: {offenders}"


def test_no_bare_tsllm_error_is_raised():
    offenders = []
    for module, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if name == "TsllmError":
                    offenders.append(f"{module}:{node.lineno}")
    assert not offenders, f"raise a specific subclass from errors.py instead: {offenders}"


def test_no_thread_pool_or_thread_at_module_scope():
    makers = {"ThreadPoolExecutor", "ProcessPoolExecutor", "Thread", "Pool"}
    offenders = []
    for module, tree in _modules():
        for stmt in tree.body:   # module scope only: functions and classes make theirs per object
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for node in ast.walk(stmt):
                if isinstance(node, ast.Call):
                    func = node.func
                    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                    if name in makers:
                        offenders.append(f"{module}:{node.lineno}")
    assert not offenders, f"a pool or thread made at import time (make it in the object that uses it): {offenders}"


def test_the_checks_see_what_they_look_for():
    """The detectors themselves, on small snippets."""
    assert _imports_facade(ast.parse("from ..api import run_plan").body[0], os.path.join("lora", "jobs.py"))
    assert _imports_facade(ast.parse("from . import api").body[0], "quickstart.py")
    assert _imports_facade(ast.parse("from tensorstore_llm.api import merge").body[0], os.path.join("merge", "soup.py"))
    assert not _imports_facade(ast.parse("from .api import prune").body[0], os.path.join("prune", "__init__.py"))
    assert not _imports_facade(ast.parse("from ..runs import export").body[0], os.path.join("lora", "jobs.py"))
