"""What a new user's trial (tests/test_user_trial.py's author) found unclear in merge and lora merge
messages: an unknown model names the recipe file and the key, a dry run shows the method asked
for, and a checkpoint given as a LoRA adapter is called what it is."""
import pytest

from tensorstore_llm.store import Store

RECIPE = """merge_method: ties
base_model: base
models:
  - model: ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: MODEL
    parameters: {weight: 0.5, density: 0.5}
dtype: float32
"""


@pytest.fixture
def imported(cli, tmp_path, tiny_family):
    s = str(tmp_path / "store")
    for ref in ("base", "ft1", "ft2"):
        code, _, err = cli("--store", s, "import", tiny_family[ref], "--name", ref)
        assert code == 0, err
    return s


def test_unknown_model_names_the_recipe_file_and_key(cli, tmp_path, imported):
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(RECIPE.replace("MODEL", "task-c"))
    code, _out, err = cli("--store", imported, "merge", recipe, "--name", "m")
    assert code == 3
    assert f"{recipe}: models[1].model: 'task-c' is not an artifact" in err, err
    assert len(Store(imported).list()) == 3   # nothing written
    base_missing = tmp_path / "slerp.yaml"
    base_missing.write_text("merge_method: slerp\nbase_model: nobase\nmodels:\n  - model: ft1\nparameters: {t: 0.5}\n")
    code, _, err = cli("--store", imported, "merge", base_missing)
    assert code == 3 and f"{base_missing}: base_model: 'nobase'" in err, err


def test_dry_run_shows_the_method_asked_for_and_its_kernel(cli, tmp_path, imported):
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(RECIPE.replace("MODEL", "ft2"))
    code, out, err = cli("--store", imported, "merge", recipe, "--dry-run")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert "method (op)" in header
    tensor_rows = [r for r in rows if r.startswith(("model.", "lm_head"))]
    assert tensor_rows and all(" ties (task_arithmetic) " in r for r in tensor_rows), tensor_rows
    linear = tmp_path / "linear.yaml"
    linear.write_text("merge_method: linear\nmodels:\n  - model: ft1\n    parameters: {weight: 0.5}\n"
                      "  - model: ft2\n    parameters: {weight: 0.5}\n")
    code, out, err = cli("--store", imported, "merge", linear, "--dry-run")
    assert code == 0, err
    rows = [r for r in out.splitlines()[1:] if r.startswith(("model.", "lm_head"))]
    assert rows and all(r.split()[1] == "linear" for r in rows), out


def test_lora_merge_of_a_checkpoint_says_it_is_not_a_lora_adapter(cli, imported, tiny_family):
    code, _, err = cli("--store", imported, "lora", "merge", "base", "base")
    assert code == 4
    assert "ADAPTER 'base' is a checkpoint artifact" in err and "not a LoRA adapter" in err, err
    assert "tsllm lora import" in err and err.count("\n") == 1
    code, _, err = cli("--store", imported, "lora", "merge", "base", tiny_family["ft1"])
    assert code == 4
    assert f"ADAPTER {tiny_family['ft1']} is a model checkpoint directory" in err, err
