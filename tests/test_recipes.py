"""mergekit recipes: parameter resolution, validation before any work, lineage, the CLI."""
import os

import pytest
import torch

from tensorstore_llm import api
from tensorstore_llm.errors import RecipeError, ShapeMismatch, TensorNotFound
from tensorstore_llm.merge.recipe import evaluate, layer_position, load_recipe


def test_gradients_and_filters_follow_mergekit():
    assert layer_position("model.layers.0.mlp.up_proj.weight", 5) == 0.0
    assert layer_position("model.layers.4.mlp.up_proj.weight", 5) == 1.0
    assert layer_position("model.embed_tokens.weight", 5) == 0.0 == layer_position("lm_head.weight", 5)
    assert layer_position("model.layers.0.x", 1) == 1.0
    assert evaluate([0.0, 1.0], "t", 0.25, "w") == 0.25
    assert evaluate([0.0, 0.5, 1.0, 0.0], "t", 0.5, "w") == pytest.approx(0.75)
    conds = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.3}, {"value": 0.9}]
    assert evaluate(conds, "model.layers.2.self_attn.q_proj.weight", 0.5, "w") == 0.5
    assert evaluate(conds, "model.layers.2.mlp.up_proj.weight", 0.5, "w") == 0.3
    assert evaluate(conds, "model.norm.weight", 0.0, "w") == 0.9


@pytest.mark.parametrize("text,message", [
    ("merge_method: frankenmerge\nmodels: [a]", "not supported"),
    ("merge_method: ties\nslices: []", "slices"),
    ("merge_method: ties\nmodels: [a]", "needs base_model"),
    ("merge_method: slerp\nbase_model: a\nmodels: [b, c]", "exactly one other"),
    ("merge_method: linear\nmodels: [a]\nbogus: 1", "unknown key"),
    ("merge_method: linear\nmodels: [a]\ntokenizer_source: c", "tokenizer_source 'c' is not a model"),
    ("merge_method: linear\nmodels: [a]\ndtype: float7", "unknown dtype"),
    ("[not, a, mapping", "not valid YAML"),
])
def test_bad_recipes_are_refused_at_parse_time(text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(text, "r.yaml")


def _ties(family, extra_model_params="", extra=""):
    return (f"merge_method: ties\nbase_model: {family['base']}\nmodels:\n"
            f"  - model: {family['ft1']}\n    parameters: {{weight: 1.0, density: 0.5{extra_model_params}}}\n"
            f"  - model: {family['ft2']}\n    parameters: {{weight: [0.2, 0.8], density: 0.5}}\n{extra}")


def test_recipe_errors_before_any_work(store, tiny_family, tmp_path):
    with pytest.raises(RecipeError, match="needs parameter 'weight'"):
        api.merge(store, _ties(tiny_family).replace("weight: 1.0, ", ""), progress=False)
    with pytest.raises(RecipeError, match="'colour' of model .* not used by ties"):
        api.merge(store, _ties(tiny_family, ", colour: 3"), progress=False)
    with pytest.raises(RecipeError, match=r"models\[0\].parameters.density must be a number in \[0, 1\], got 2"):
        api.merge(store, _ties(tiny_family).replace("density: 0.5", "density: 2", 1), progress=False)
    from safetensors.torch import save_file
    odd = tmp_path / "odd"
    os.makedirs(odd)
    save_file({"model.embed_tokens.weight": torch.zeros(600, 64, dtype=torch.bfloat16)}, str(odd / "model.safetensors"))
    with pytest.raises(ShapeMismatch, match=r"model.embed_tokens.weight.*\(600, 64\).*\(512, 64\)"):
        api.merge(store, _ties(tiny_family).replace(tiny_family["ft2"], str(odd)), progress=False)
    save_file({"model.embed_tokens.weight": torch.zeros(512, 64, dtype=torch.bfloat16)}, str(odd / "model.safetensors"))
    with pytest.raises(TensorNotFound, match="model.layers.0"):
        api.merge(store, _ties(tiny_family).replace(tiny_family["ft2"], str(odd)), progress=False)
    assert store.list() == []


def test_merge_records_lineage_and_gradient(store, tiny_family):
    for k in ("base", "ft1", "ft2"):
        api.import_checkpoint(tiny_family[k], store, name=k, progress=False)
    text = ("merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: ft1\n    parameters: {weight: [0.0, 1.0]}\n"
            "  - model: ft2\n    parameters: {weight: 0.0}\nout_dtype: float32\n")
    art = api.merge(store, text, name="m", progress=False).artifact
    roles = {p["ref"]: p["role"] for p in art.manifest.parents}
    assert roles == {"base": "base", "ft1": "model", "ft2": "model"}
    assert art.manifest.recipe["merge_method"] == "task_arithmetic" and art.manifest.recipe["recipe"]["base_model"] == "base"
    with store.open("m") as out, store.open("base") as b, store.open("ft1") as x:
        name0, name1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
        assert torch.equal(out.read(name0), b.read(name0).float())                       # weight 0 at layer 0
        assert torch.equal(out.read(name1), b.read(name1).float() + (x.read(name1).float() - b.read(name1).float()))


def test_merge_cli(cli, tmp_path, tiny_family):
    s = str(tmp_path / "store")
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(_ties(tiny_family, extra="dtype: bfloat16\n"))
    code, out, err = cli("--store", s, "merge", str(recipe), "--dry-run", "--max-memory", "32K")
    assert code == 0 and "task_arithmetic" in out and "peak tensor memory" in out, err
    code, out, err = cli("--store", s, "merge", str(recipe), "--name", "t", "-o", str(tmp_path / "hf"))
    assert code == 0 and "merged" in out and os.path.exists(tmp_path / "hf" / "config.json"), err
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: ties\nbase_model: nope\nmodels: [x]\n")
    code, _, err = cli("--store", s, "merge", str(bad))
    assert code != 0 and err.startswith("error: ") and "nope" in err
    bad.write_text("merge_method: magic\n")
    code, _, err = cli("--store", s, "merge", str(bad))
    assert code == 7 and "bad.yaml" in err


def test_mergekit_arithmetic_from_the_cli_and_where_it_is_refused(cli, tmp_path, tiny_family, store):
    s = str(tmp_path / "store")
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(_ties(tiny_family, extra="dtype: bfloat16\n"))
    code, _out, err = cli("--store", s, "merge", str(recipe), "--arithmetic", "mergekit", "--name", "mk")
    assert code == 0, err
    code, _out, err = cli("--store", s, "merge", str(recipe), "--name", "fp32")
    assert code == 0, err
    from tensorstore_llm.store import Store
    st = Store(s)
    assert st.get("mk").id != st.get("fp32").id
    assert st.get("mk").manifest.recipe["arithmetic"] == "mergekit"
    slerp = tmp_path / "slerp.yaml"
    slerp.write_text(f"merge_method: slerp\nbase_model: {tiny_family['ft1']}\nmodels: [{tiny_family['ft2']}]\nparameters: {{t: 0.5}}\n")
    code, _, err = cli("--store", s, "merge", str(slerp), "--arithmetic", "mergekit")
    assert code == 7 and "not for slerp" in err
