"""``tsllm merge -o DIR`` writes once (issue 14, item 4): the tensors go straight into the Hugging
Face directory, the store keeps a tensorless ``export`` record of the lineage, and the directory
carries the recipe (``mergekit_config.yml``) and a model card. ``--keep-artifact`` keeps the
stored checkpoint too; ``tsllm export`` of a merged artifact carries the same two files.
"""
import os

import pytest
import torch
import yaml

from tensorstore_llm import __version__, api
from tensorstore_llm.store import Store

from helpers import dir_tensors


def _ties(family):
    return (f"merge_method: ties\nbase_model: {family['base']}\nmodels:\n"
            f"  - model: {family['ft1']}\n    parameters: {{weight: 1.0, density: 0.4}}\n"
            f"  - model: {family['ft2']}\n    parameters: {{weight: [0.2, 0.9], density: 0.6}}\n"
            f"parameters: {{normalize: true}}\ndtype: bfloat16\n")


def test_merge_o_writes_the_directory_once_and_records_lineage(cli, tmp_path, tiny_family):
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(_ties(tiny_family))
    root, out = str(tmp_path / "store"), tmp_path / "hf"
    code, stdout, err = cli("--store", root, "merge", recipe, "--name", "m", "-o", out, "--max-memory", "64K",
                            "--max-shard-size", "100K")
    assert code == 0, err
    assert "lineage record" in stdout
    store = Store(root)
    artifacts = store.list()
    assert [a.kind for a in artifacts] == ["export"]           # no checkpoint copy in the store
    record = store.get("m")
    assert record.manifest.tensors == {}
    assert record.manifest.info["output"] == os.path.abspath(out)
    assert {p["role"] for p in record.manifest.parents} == {"base", "model"}
    assert record.manifest.recipe["merge_method"] == "ties"

    # the same tensors as a merge into the store, bit for bit
    reference = Store(str(tmp_path / "reference"))
    stored = api.merge(reference, _ties(tiny_family), progress=False).artifact
    written = dir_tensors(out)
    with reference.open(stored.id) as merged:
        assert sorted(written) == sorted(merged.keys()) == sorted(record.manifest.info["tensors"])
        for name in merged.keys():
            assert torch.equal(written[name].view(torch.int16), merged.read(name).view(torch.int16)), name
            shape, dtype, checksum = record.manifest.info["tensors"][name]
            assert shape == list(written[name].shape) and dtype == "bfloat16"
            assert checksum == stored.manifest.tensors[name].checksum
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    assert os.path.exists(out / "model.safetensors.index.json") and os.path.exists(out / "config.json")

    # the recipe and the model card
    assert yaml.safe_load((out / "mergekit_config.yml").read_text()) == yaml.safe_load(_ties(tiny_family))
    card = (out / "README.md").read_text()
    assert "ties" in card and __version__ in card
    for ref in tiny_family.values():
        assert ref in card


def test_keep_artifact_stores_the_checkpoint_too(cli, tmp_path, tiny_family):
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(_ties(tiny_family))
    root, out = str(tmp_path / "store"), tmp_path / "hf"
    code, _, err = cli("--store", root, "merge", recipe, "--name", "m", "-o", out, "--keep-artifact")
    assert code == 0, err
    store = Store(root)
    assert [a.kind for a in store.list()] == ["checkpoint"]
    with store.open("m") as merged:
        written = dir_tensors(out)
        assert all(torch.equal(written[n], merged.read(n)) for n in merged.keys())
    assert (out / "mergekit_config.yml").exists() and (out / "README.md").exists()
    code, _, err = cli("--store", root, "merge", recipe, "--keep-artifact")
    assert code != 0 and "--keep-artifact" in err


def test_export_of_a_merged_artifact_carries_recipe_and_card(tmp_path, tiny_family):
    store = Store(str(tmp_path / "store"))
    artifact = api.merge(store, _ties(tiny_family), progress=False).artifact
    out = tmp_path / "exported"
    api.export(store, artifact.id, str(out), progress=False)
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "ties"
    assert "# Merged model" in (out / "README.md").read_text()
    # an artifact that is not a merge gets neither
    imported = api.import_checkpoint(tiny_family["base"], store, progress=False).artifact
    plain = tmp_path / "plain"
    api.export(store, imported.id, str(plain), progress=False)
    assert not (plain / "mergekit_config.yml").exists() and not (plain / "README.md").exists()


# -- leniency where mergekit is lenient (issue 14, item 5) --------------------------------------

def _stock(family, extra_model="", extra=""):
    return (f"merge_method: model_stock\nbase_model: {family['base']}\nmodels:\n"
            f"  - model: {family['ft1']}\n    parameters: {{{extra_model}}}\n"
            f"  - model: {family['ft2']}\n{extra}")


def test_parameters_a_method_ignores_are_warned_about_not_refused(cli, tmp_path, tiny_family):
    from tensorstore_llm.errors import RecipeError, RecipeWarning

    plain = api.merge(Store(str(tmp_path / "a")), _stock(tiny_family), progress=False).artifact
    with pytest.warns(RecipeWarning, match="'weight' of model .* not used by model_stock"):
        lenient = api.merge(Store(str(tmp_path / "b")), _stock(tiny_family, "weight: 0.3"), progress=False).artifact
    assert lenient.manifest.tensors == plain.manifest.tensors          # ignored, as mergekit ignores it
    assert lenient.manifest.recipe["recipe"]["models"][0]["parameters"] == {"weight": 0.3}   # lineage keeps it
    slerp = (f"merge_method: slerp\nbase_model: {tiny_family['base']}\nmodels:\n  - model: {tiny_family['base']}\n"
             f"    parameters: {{weight: 1.0}}\n  - model: {tiny_family['ft1']}\n    parameters: {{weight: 1.0}}\n"
             f"parameters: {{t: 0.3}}\n")
    with pytest.warns(RecipeWarning, match="'weight' .* not used by slerp"):
        api.merge(Store(str(tmp_path / "c")), slerp, progress=False)
    with pytest.raises(RecipeError, match="'colour' of model .* not used by model_stock"):   # a typo stays an error
        api.merge(Store(str(tmp_path / "d")), _stock(tiny_family, "colour: 1"), progress=False)
    recipe = tmp_path / "stock.yaml"
    recipe.write_text(_stock(tiny_family, "weight: 0.3"))
    code, _, err = cli("--store", tmp_path / "e", "merge", recipe)
    assert code == 0 and err.startswith("warning: ") and "'weight'" in err, err


@pytest.fixture
def chat_family(tmp_path, tiny_family):
    """The tiny family with tokenizer_config.json files: ft1 and ft2 share a chat template."""
    import json
    import shutil

    paths, templates = {}, {"base": "{{ 'base' }}", "ft1": "{% for m in messages %}{{ m.content }}{% endfor %}",
                            "ft2": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    for key, template in templates.items():
        paths[key] = str(tmp_path / "chat" / key)
        shutil.copytree(tiny_family[key], paths[key])
        with open(os.path.join(paths[key], "tokenizer_config.json"), "w") as f:
            json.dump({"model_max_length": 128, "chat_template": template}, f)
    return paths, templates


@pytest.mark.parametrize("setting,expected", [("auto", "ft1"), ("'{{ messages[0].content }}!'", None)])
def test_chat_template_is_written_into_the_output(tmp_path, chat_family, setting, expected):
    import json

    family, templates = chat_family
    text = _stock(family, extra=f"chat_template: {setting}\n")
    out = tmp_path / "hf"
    api.merge(Store(str(tmp_path / "s")), text, out_dir=str(out), progress=False)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (templates[expected] if expected else "{{ messages[0].content }}!")
    assert config["model_max_length"] == 128                     # the base's other settings kept


@pytest.mark.parametrize("extra,match", [
    ("chat_template: '{% for m in messages %}{{ m.content }'\n", "chat_template does not parse"),
    ("chat_template: chatml\n", "chat_template 'chatml' is a template name"),
    ("tokenizer_source: union\n", "model .* has no tokenizer files"),
    ("tokenizer: {source: base, tokens: {x: {source: nobody}}}\n", "model 'nobody' is not in the recipe"),
    ("tokenizer: {source: base, pad_to_multiple_of: 0}\n", "tokenizer.pad_to_multiple_of must be a positive integer"),
])
def test_tokenizer_and_chat_template_refusals_name_the_key_before_any_work(tmp_path, chat_family, extra, match):
    from tensorstore_llm.errors import RecipeError

    store = Store(str(tmp_path / "s"))
    with pytest.raises(RecipeError, match=match):
        api.merge(store, _stock(chat_family[0], extra=extra), out_dir=str(tmp_path / "hf"), progress=False)
    assert store.list() == [] and not (tmp_path / "hf").exists()


def test_tokenizer_block_with_source_base_is_the_default(tmp_path, tiny_family):
    plain = api.merge(Store(str(tmp_path / "a")), _stock(tiny_family), progress=False).artifact
    block = api.merge(Store(str(tmp_path / "b")), _stock(tiny_family, extra="tokenizer: {source: base}\n"),
                      progress=False).artifact
    assert block.manifest.tensors == plain.manifest.tensors
