"""One mapping from errors to exit codes (issue 8, item 11): every TsllmError subclass exits with
its documented code through the real CLI, as one ``error:`` line."""
import os
import re
import sys
import types

import click
import pytest

import tensorstore_llm.errors as errors
import tensorstore_llm_cli
from tensorstore_llm.errors import TsllmError

README = os.path.join(os.path.dirname(__file__), "..", "README.md")

# The families README documents, by their root classes; a subclass exits with its family's code.
FAMILIES = {
    errors.ArtifactNotFound: 3, errors.RefError: 3,
    errors.FormatError: 4,
    errors.IntegrityError: 5,
    errors.TensorNotFound: 6, errors.ShapeMismatch: 6, errors.DTypeError: 6, errors.InvalidTensorName: 6,
    errors.RecipeError: 7,
    errors.StorageError: 8,
}


def _all_subclasses(cls):
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return list(dict.fromkeys(found))


ERRORS = [c for c in _all_subclasses(TsllmError) if c.__module__ == errors.__name__]


def _documented_codes():
    """{code: meaning} from README's sentence on exit codes."""
    text = " ".join(open(README, encoding="utf-8").read().split())
    sentence = re.search(r"non-zero exit code \((.*?)\), and nothing", text)
    assert sentence, "README must list the exit codes"
    return {int(code): meaning.strip() for code, meaning in re.findall(r"(\d) ([^,0-9]+)", sentence.group(1))}


def test_the_walk_finds_the_hierarchy():
    names = {c.__name__ for c in ERRORS}
    assert {"ArtifactNotFound", "FormatError", "UnsafeFormat", "IntegrityError", "ShapeMismatch", "RecipeError",
            "InvalidParameter", "StorageError", "OutputExists"} <= names


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_every_error_class_has_its_documented_code(cls):
    documented = _documented_codes()
    assert cls.exit_code in documented, f"{cls.__name__} exits {cls.exit_code}, which README does not document"
    family = next((code for root, code in FAMILIES.items() if issubclass(cls, root)), None)
    if family is not None:
        assert cls.exit_code == family, f"{cls.__name__} is a {family}-family error but exits {cls.exit_code}"
    for parent in cls.__mro__[1:]:
        if parent is not TsllmError and issubclass(parent, TsllmError):
            assert cls.exit_code == parent.exit_code, f"{cls.__name__} leaves the code of its parent {parent.__name__}"


@pytest.mark.parametrize("cls", [TsllmError, *ERRORS], ids=lambda c: c.__name__)
def test_the_cli_maps_every_error_to_its_code(cli, monkeypatch, cls):
    @click.command("raise-it")
    def raise_it():
        raise cls(f"tensor 'model.norm.weight' of artifact abc: {cls.__name__} happened")

    module = types.ModuleType("tensorstore_llm_cli._raise_it")
    module.raise_it = raise_it
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(tensorstore_llm_cli._COMMANDS, "raise-it", ("_raise_it", "raise_it"))
    code, out, err = cli("raise-it")
    assert code == cls.exit_code
    assert err == f"error: tensor 'model.norm.weight' of artifact abc: {cls.__name__} happened\n"
    assert "Traceback" not in err and out == ""


def test_real_commands_exit_with_the_family_code(cli, tmp_path, tiny_family):
    """A few of the mapped paths end to end, with real files."""
    root = tmp_path / "store"
    assert cli("--store", root, "-q", "import", tiny_family["base"], "--name", "base")[0] == 0
    assert cli("--store", root, "show", "nope")[0] == 3
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    assert cli("--store", root, "import", bad)[0] == 4
    assert cli("--store", root, "weighted-sum", "base", "--weights", "1,1")[0] == 7
    assert cli("--store", root, "weighted-sum", "base", "--weights", "one")[0] == 2   # not a number: usage error
    assert cli("--store", root, "weighted-sum", "base", "--weights", "nan")[0] == 7   # a number out of its domain
    assert cli("--store", root, "convert", "base", "--dtype", "int8")[0] == 6
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels: [base, missing]\nparameters: {weight: 1}\n")
    assert cli("--store", root, "merge", recipe)[0] == 3
