"""Every registered op has an OpConformance subclass somewhere in the test suite.

The test files are read, not imported (importing every test module would run their module-level
setup): a class counts when it derives, directly or through other test classes, from
``OpConformance`` and it or an ancestor sets ``op = "<name>"``. Ops registered only by tests
(``test_*``) are left out.
"""
from __future__ import annotations

import ast
import os

from tensorstore_llm.ops.registry import list_ops

TESTS = os.path.dirname(os.path.abspath(__file__))
BASE = "OpConformance"


def _classes(path: str) -> dict[str, tuple[list[str], str | None]]:
    """class name -> (base class names, the op it sets or None) of one test file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        bases = [b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "" for b in node.bases]
        op = None
        for stmt in node.body:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
            value = getattr(stmt, "value", None)
            if any(isinstance(t, ast.Name) and t.id == "op" for t in targets) and isinstance(value, ast.Constant) \
                    and isinstance(value.value, str):
                op = value.value
        out[node.name] = (bases, op)
    return out


def covered_ops() -> dict[str, list[str]]:
    """op name -> the conformance classes ("file::Class") that cover it, over every test file."""
    classes: dict[str, tuple[list[str], str | None]] = {}
    where: dict[str, str] = {}
    for root, _dirs, files in os.walk(TESTS):
        for name in sorted(files):
            if name.startswith("test_") and name.endswith(".py"):
                for cls, info in _classes(os.path.join(root, name)).items():
                    classes.setdefault(cls, info)
                    where.setdefault(cls, name)

    def resolve(cls: str, seen=()) -> tuple[bool, str | None]:
        """(derives from OpConformance, op set by it or its nearest ancestor)."""
        if cls == BASE:
            return True, None
        if cls not in classes or cls in seen:
            return False, None
        bases, op = classes[cls]
        conforms, inherited = False, None
        for base in bases:
            c, o = resolve(base, (*seen, cls))
            conforms = conforms or c
            inherited = inherited or o
        return conforms, op or inherited

    covered: dict[str, list[str]] = {}
    for cls in classes:
        conforms, op = resolve(cls)
        if conforms and op:
            covered.setdefault(op, []).append(f"{where[cls]}::{cls}")
    return covered


def test_every_registered_op_has_a_conformance_subclass():
    covered = covered_ops()
    missing = sorted(name for name in list_ops() if not name.startswith("test_") and name not in covered)
    assert not missing, (f"ops without an OpConformance subclass in tests/ (set op = '<name>' on a subclass): "
                         f"{', '.join(missing)}")


def test_the_scan_finds_known_subclasses():
    """The AST scan itself: classes through a chain of test classes, and inherited op names."""
    covered = covered_ops()
    assert "test_op_conformance.py::TestCopy" in covered["copy"]
    assert "test_op_conformance.py::TestDoraMergeTransposed" in covered["dora_merge_transposed"]   # via TestDoraMerge
    assert "test_op_conformance.py::TestMergekitTies" in covered["mergekit_task_arithmetic"]      # op set on the class
    assert "test_op_conformance.py::TestTwoOutputs" in covered["test_sign_scale"]                 # a test-registered op
