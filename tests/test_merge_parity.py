"""``tsllm merge -o DIR`` writes once (issue 14, item 4): the tensors go straight into the Hugging
Face directory, the store keeps a tensorless ``export`` record of the lineage, and the directory
carries the recipe (``mergekit_config.yml``) and a model card. ``--keep-artifact`` keeps the
stored checkpoint too; ``tsllm export`` of a merged artifact carries the same two files.
"""
import os

import torch
import yaml
from safetensors.torch import load_file

from tensorstore_llm import __version__, api
from tensorstore_llm.store import Store


def _ties(family):
    return (f"merge_method: ties\nbase_model: {family['base']}\nmodels:\n"
            f"  - model: {family['ft1']}\n    parameters: {{weight: 1.0, density: 0.4}}\n"
            f"  - model: {family['ft2']}\n    parameters: {{weight: [0.2, 0.9], density: 0.6}}\n"
            f"parameters: {{normalize: true}}\ndtype: bfloat16\n")


def _tensors(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


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
    written = _tensors(out)
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
        written = _tensors(out)
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
