"""Adapters as store artifacts: import bound to a base, export that PEFT loads with the same
logits, merge from an artifact (refused on another base unless --transfer, recorded in the
lineage), prefix-tuning adapters stored but never merged, show / log, and bad input."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

peft = pytest.importorskip("peft", reason="PEFT is not installed (pip install -e .[test]); LoRA artifact tests skipped")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from safetensors.torch import load_file  # noqa: E402

from tensorstore_llm.store import Store  # noqa: E402

from helpers import random_peft_adapter, tiny_llama  # noqa: E402


@pytest.fixture()
def models(tmp_path):
    """A base and another model of the same shapes (directories), and a LoRA adapter of the base."""
    tiny_llama(0).save_pretrained(tmp_path / "base")
    tiny_llama(1).save_pretrained(tmp_path / "other")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                          rank_pattern={"down_proj": 2}, modules_to_save=["lm_head"])
    random_peft_adapter(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter", cfg)
    return tmp_path


def _logits(model_dir, adapter_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    pm = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    ids = torch.arange(12).reshape(1, 12) % 96
    with torch.no_grad():
        return pm(input_ids=ids).logits


def test_import_export_round_trip_loads_in_peft_with_the_same_logits(models, cli):
    s = str(models / "store")
    assert cli("-q", "--store", s, "import", models / "base", "--name", "b0")[0] == 0
    code, out, err = cli("--store", s, "lora", "import", models / "adapter", "--base", "b0", "--name", "ad")
    assert code == 0, err
    art = Store(s).get("ad")
    info = art.manifest.info
    assert art.kind == "lora" and art.manifest.info_schema == "lora/1"
    assert info["base"]["id"] == Store(s).get("b0").id
    base_sums = Store(s).get("b0").manifest.checksums()
    targets = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    assert set(info["base"]["checksums"]) == ({f"model.layers.{i}.{m}.weight" for i in range(2) for m in targets}
                                              | {"lm_head.weight"})
    assert all(base_sums[n] == c for n, c in info["base"]["checksums"].items())
    assert info["ranks"]["model.layers.0.mlp.down_proj"] == 2 and info["dora"]
    code, _, err = cli("--store", s, "lora", "export", "ad", models / "exported")
    assert code == 0, err
    before = load_file(str(models / "adapter" / "adapter_model.safetensors"))
    after = load_file(str(models / "exported" / "adapter_model.safetensors"))
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_logits(models / "base", models / "adapter"), _logits(models / "base", models / "exported"))
    # show and log name the base, the rank per module and the parameter count
    code, out, _ = cli("--store", s, "show", "ad")
    assert "LORA DoRA r=2..4 on 6 modules" in out and f"base      {Store(s).get('b0').short_id}" in out
    assert "r=2     model.layers.1.mlp.down_proj" in out
    params = sum(t.numel() for t in before.values())
    assert f"{params:,} parameters" in out
    code, out, _ = cli("--store", s, "log", "ad")
    assert f"{params:,} parameters" in out and "base: " + Store(s).get("b0").short_id in out


def test_merge_from_artifact_binds_to_its_base(models, cli):
    s = str(models / "store")
    for name in ("base", "other"):
        assert cli("-q", "--store", s, "import", models / name, "--name", f"{name}0")[0] == 0
    assert cli("-q", "--store", s, "lora", "import", models / "adapter", "--base", "base0", "--name", "ad")[0] == 0
    # from the artifact and from the directory: the same merged checkpoint (same bytes)
    code, _, err = cli("-q", "--store", s, "lora", "merge", "base0", "ad", "--name", "m1", "-o", models / "m1")
    assert code == 0, err
    assert cli("-q", "--store", s, "lora", "merge", models / "base", models / "adapter", "-o", models / "m2")[0] == 0
    m1, m2 = load_file(str(models / "m1" / "model.safetensors")), load_file(str(models / "m2" / "model.safetensors"))
    assert all(torch.equal(m1[k], m2[k]) for k in m2)
    # a directory with the base's bytes is the same base: accepted by checksum
    assert cli("-q", "--store", s, "lora", "merge", models / "base", "ad")[0] == 0
    # another base: refused before anything is written, naming the base and a tensor
    count = len(Store(s).list())
    code, _, err = cli("--store", s, "lora", "merge", "other0", "ad")
    assert code == 6 and "--transfer" in err and "weight" in err and err.count("\n") == 1
    assert len(Store(s).list()) == count
    # --transfer: done, reported, recorded in the lineage
    code, _out, err = cli("--store", s, "lora", "merge", "other0", "ad", "--transfer", "--name", "moved")
    assert code == 0 and "transfer" in err
    recipe = Store(s).get("moved").manifest.recipe
    assert recipe["transfer"]["from"]["id"] == Store(s).get("base0").id and recipe["transfer"]["mismatched"]
    assert "transferred" in cli("--store", s, "log", "moved")[1]


def test_prefix_tuning_adapter_is_stored_but_never_merged(models, cli):
    model = transformers.AutoModelForCausalLM.from_pretrained(models / "base")
    pm = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    pm.save_pretrained(str(models / "prefix"))
    s = str(models / "store")
    code, _, err = cli("-q", "--store", s, "lora", "import", models / "prefix", "--base", models / "base", "--name",
                       "px")
    assert code == 0, err
    art = Store(s).get("px")
    assert art.manifest.info["peft_type"] == "PREFIX_TUNING" and art.manifest.info["num_params"] == 5 * 2 * 2 * 32
    assert "PREFIX_TUNING, 640 parameters" in cli("--store", s, "show", "px")[1]
    code, _, err = cli("--store", s, "lora", "merge", models / "base", "px")
    assert code != 0 and "prefix" in err and "cannot be merged" in err
    assert cli("--store", s, "lora", "export", "px", models / "px-out")[0] == 0
    ids = torch.arange(8).reshape(1, 8)
    with torch.no_grad():
        before = pm.eval()(input_ids=ids).logits
        reloaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(models / "base"),
                                                  str(models / "px-out")).eval()
        assert torch.equal(before, reloaded(input_ids=ids).logits)


def test_bad_adapters_are_refused_at_import_with_nothing_written(models, cli):
    s = str(models / "store")
    os.makedirs(s)
    # a base whose q_proj has another shape
    small = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(small).save_pretrained(models / "small")
    code, _, err = cli("--store", s, "lora", "import", models / "adapter", "--base", models / "small")
    assert code == 6 and "down_proj" in err and "(32, 64)" in err
    # a target module the base does not have
    bad = models / "bad"
    shutil.copytree(models / "adapter", bad)
    t = load_file(str(bad / "adapter_model.safetensors"))
    from safetensors.torch import save_file
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in t.items()}, str(bad / "adapter_model.safetensors"))
    code, _, err = cli("--store", s, "lora", "import", bad, "--base", models / "base")
    assert code == 6 and "layers.7" in err and "has no tensor" in err
    # rank 0 and a rank above min(out, in)
    cfg = json.loads((models / "adapter" / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))
    code, _, err = cli("--store", s, "lora", "import", bad, "--base", models / "base")
    assert code == 4 and "positive integer rank" in err
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": torch.ones(65, 64), f"{key}.lora_B.weight": torch.ones(64, 65)},
              str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 65, "rank_pattern": {}, "use_dora": False,
                                                         "modules_to_save": None, "target_modules": ["q_proj"]}))
    code, _, err = cli("--store", s, "lora", "import", bad, "--base", models / "base")
    assert code == 4 and "rank 65" in err and "min(out, in) = 64" in err
    # a pickled adapter
    os.rename(models / "adapter" / "adapter_model.safetensors", models / "adapter" / "adapter_model.bin")
    code, _, err = cli("--store", s, "lora", "import", models / "adapter", "--base", models / "base")
    assert code == 4 and "pickle" in err.lower()
    assert Store(s).list() == []


def test_qlora_merge_into_the_nf4_base_reports_q_over_delta_and_requantises(models, cli):
    from tensorstore_llm.lora.nf4 import nf4_roundtrip

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    random_peft_adapter(transformers.AutoModelForCausalLM.from_pretrained(models / "base"), models / "qlora", cfg)
    s = str(models / "store")
    code, out, err = cli("--store", s, "lora", "merge", models / "base", models / "qlora", "--base-quant", "nf4",
                         "--requantize", "nf4", "-o", models / "merged")
    assert code == 0, err
    base = load_file(str(models / "base" / "model.safetensors"))
    ad = load_file(str(models / "qlora" / "adapter_model.safetensors"))
    merged = load_file(str(models / "merged" / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    A, B = ad[f"base_model.model.{name}.lora_A.weight"], ad[f"base_model.model.{name}.lora_B.weight"]
    delta = 2.0 * (B @ A)
    w = base[name + ".weight"]
    into_nf4 = nf4_roundtrip(w) + delta                      # the weights the adapter trained against
    assert torch.equal(merged[name + ".weight"], nf4_roundtrip(into_nf4))
    q_over_delta = float((w - nf4_roundtrip(w)).norm() / delta.norm())
    requant = float((into_nf4 - nf4_roundtrip(into_nf4)).norm() / delta.norm())
    line = next(x for x in out.splitlines() if x.startswith(name))
    assert f"{q_over_delta:.6g}" in line and f"{requant:.6g}" in line
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    code, _, err = cli("--store", s, "lora", "merge", models / "base", models / "qlora", "--requantize", "nf4")
    assert code == 2 and "--base-quant" in err
