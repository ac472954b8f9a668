"""Prefix-tuning (P-Tuning v2) adapters are bound to their base by content: the shape fields of
its config.json and the checksums of the embedding and attention weights they depend on. A base
that differs in any of them is refused clearly (naming what differs), with nothing written; a
base that differs only elsewhere (the MLP) is the same base for a prefix."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

peft = pytest.importorskip("peft",
                           reason="PEFT is not installed (pip install -e .[test]); prefix binding tests skipped")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from safetensors.torch import load_file, save_file  # noqa: E402

from tensorstore_llm.store import Store  # noqa: E402


def _tiny(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def _edited_copy(src, dst, *, tensor=None, config=None):
    """A copy of checkpoint ``src`` with one tensor perturbed and / or config fields replaced."""
    shutil.copytree(src, dst)
    if tensor is not None:
        path = os.path.join(dst, "model.safetensors")
        tensors = load_file(path)
        tensors[tensor] = tensors[tensor] + 0.01
        save_file(tensors, path, metadata={"format": "pt"})
    if config is not None:
        path = os.path.join(dst, "config.json")
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**cfg, **config}, f)
    return dst


@pytest.fixture()
def models(tmp_path):
    base = tmp_path / "base"
    model = _tiny(0)
    model.save_pretrained(base)
    _tiny(1).save_pretrained(tmp_path / "other")
    pm = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    pm.save_pretrained(str(tmp_path / "prefix"))
    return tmp_path


def test_prefix_binding_records_config_and_attention_checksums(models, cli):
    s = str(models / "store")
    assert cli("-q", "--store", s, "import", models / "base", "--name", "b0")[0] == 0
    code, _, err = cli("-q", "--store", s, "lora", "import", models / "prefix", "--base", "b0", "--name", "px")
    assert code == 0, err
    store = Store(s)
    bound = store.get("px").manifest.info["base"]
    assert bound["config"] == {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "head_dim": 16}
    expected = ["model.embed_tokens.weight"] + [f"model.layers.{i}.self_attn.{p}_proj.weight"
                                                for i in range(2) for p in "qkvo"]
    assert sorted(bound["checksums"]) == sorted(expected)
    recorded = store.get("b0").manifest.checksums()
    assert all(bound["checksums"][n] == recorded[n] for n in expected)
    # its own base, as the artifact or as the directory it came from (hashed): exported
    assert cli("-q", "--store", s, "lora", "export", "px", models / "out1", "--base", "b0")[0] == 0
    code, _, err = cli("-q", "--store", s, "lora", "export", "px", models / "out2", "--base", models / "base")
    assert code == 0, err
    # a base that differs only in the MLP: the prefix does not depend on it
    mlp = _edited_copy(models / "base", models / "mlp", tensor="model.layers.1.mlp.up_proj.weight")
    assert cli("-q", "--store", s, "lora", "export", "px", models / "out3", "--base", mlp)[0] == 0


@pytest.mark.parametrize("what", ["other", "embedding", "attention", "config", "layers"])
def test_prefix_on_another_base_is_refused_with_nothing_written(models, cli, what):
    s = str(models / "store")
    assert cli("-q", "--store", s, "lora", "import", models / "prefix", "--base", models / "base", "--name",
               "px")[0] == 0
    if what == "other":
        base, words = models / "other", "model.embed_tokens.weight"
    elif what == "embedding":
        base = _edited_copy(models / "base", models / "e", tensor="model.embed_tokens.weight")
        words = "model.embed_tokens.weight"
    elif what == "attention":
        base = _edited_copy(models / "base", models / "a", tensor="model.layers.1.self_attn.v_proj.weight")
        words = "model.layers.1.self_attn.v_proj.weight"
    elif what == "config":   # same tensors, read with other heads: 2 heads of 32 instead of 4 of 16
        base = _edited_copy(models / "base", models / "c", config={"num_attention_heads": 2, "head_dim": 32})
        words = "config.json num_attention_heads (2 here, 4 recorded)"
    else:
        _tiny(0, layers=3).save_pretrained(models / "deep")
        base, words = models / "deep", "num_hidden_layers (3 here, 2 recorded)"
    code, _, err = cli("--store", s, "lora", "export", "px", models / "out", "--base", base)
    assert code == 6 and "another base" in err and words in err, err
    assert not os.path.exists(models / "out")
    assert [a.kind for a in Store(s).list()] == ["lora"]
    # importing the prefix against a base of other shape fails before anything is stored
    if what == "layers":
        code, _, err = cli("--store", s, "lora", "import", models / "prefix", "--base", base)
        assert code == 6 and "prefix for 2 layers, base has 3" in err, err
        assert len(Store(s).list()) == 1


def test_prefix_needs_a_base_config(models, cli, tmp_path):
    s = str(models / "store")
    bare = tmp_path / "bare"
    os.makedirs(bare)
    shutil.copy(models / "base" / "model.safetensors", bare / "model.safetensors")
    code, _, err = cli("--store", s, "lora", "import", models / "prefix", "--base", bare)
    assert code == 4 and "no config.json" in err and "prefix" in err, err
    assert not os.path.exists(s) or Store(s).list() == []
