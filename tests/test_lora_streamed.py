"""`tsllm lora merge`: the streamed merge equals PEFT's merge_and_unload() (bit for bit when a
module is computed whole, to fp32 rounding in tiny row blocks), for plain LoRA, rsLoRA with
patterns, DoRA, embedding LoRA and modules_to_save."""
from __future__ import annotations

import os

import pytest
import torch

peft = pytest.importorskip("peft", reason="PEFT is not installed (pip install -e .[test]); streamed LoRA tests skipped")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from safetensors.torch import load_file  # noqa: E402

from tensorstore_llm import api  # noqa: E402
from tensorstore_llm.store import Store  # noqa: E402

from helpers import random_peft_adapter, tiny_llama  # noqa: E402

CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
    "rslora-patterns": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "down_proj"],
                            rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3}),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "gate_proj"]),
    "embedding-save": dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "v_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_merge_equals_peft(tmp_path, cli, case):
    tiny_llama(dtype=torch.float32).save_pretrained(tmp_path / "base")
    pm = random_peft_adapter(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter",
                  peft.LoraConfig(**CASES[case]))
    expected = {k: v for k, v in pm.merge_and_unload().state_dict().items()}
    s = str(tmp_path / "store")
    for budget in ("64M", "24K"):                    # whole tensors, then many row blocks
        out = tmp_path / f"out-{budget}"
        code, _, err = cli("-q", "--store", s, "lora", "merge", str(tmp_path / "base"), str(tmp_path / "adapter"),
                           "--max-memory", budget, "-o", str(out))
        assert code == 0, err
        merged = load_file(str(out / "model.safetensors"))
        assert set(merged) == set(expected)
        for name, value in expected.items():
            if budget == "64M":      # whole tensors: the same fp32 products as PEFT, bit for bit
                assert torch.equal(merged[name], value), (case, budget, name)
            else:                    # tiny row blocks: BLAS may sum the r products in another order
                assert torch.allclose(merged[name], value, rtol=1e-6, atol=1e-7), (case, budget, name)
    art = Store(s).list()[-1]
    assert art.manifest.recipe["op"] == "lora_merge" and [p["role"] for p in art.manifest.parents] == ["base",
                                                                                                       "adapter"]


def test_bf16_base_rounds_once(tmp_path):
    tiny_llama(dtype=torch.bfloat16).save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    random_peft_adapter(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16),
             tmp_path / "adapter", cfg)
    store = Store(str(tmp_path / "store"))
    result = api.lora_merge(store, str(tmp_path / "base"), str(tmp_path / "adapter"), scale=0.5,
                            max_memory="16K", progress=False)
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    ad = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    A = ad[f"base_model.model.{name}.lora_A.weight"].float()
    B = ad[f"base_model.model.{name}.lora_B.weight"].float()
    direct = (base[name + ".weight"].float() + (B @ A) * (8 / 4 * 0.5)).to(torch.bfloat16)
    with store.open(result.artifact.id) as src:
        assert torch.equal(src.read(name + ".weight"), direct)
        assert torch.equal(src.read("model.norm.weight"), base["model.norm.weight"])
    assert result.estimate.jobs and max(j.blocks for j in result.estimate.jobs) > 1


def test_bad_adapters_are_clear_errors_and_write_nothing(tmp_path, cli):
    tiny_llama(dtype=torch.float32).save_pretrained(tmp_path / "base")
    random_peft_adapter(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter",
             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    s = str(tmp_path / "store")
    other = tiny_llama(dtype=torch.float32)
    other.config.hidden_size = 64
    # a base whose q_proj has another shape: the adapter does not fit
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "small")
    code, _, err = cli("--store", s, "lora", "merge", str(tmp_path / "small"), str(tmp_path / "adapter"))
    assert code == 6 and "q_proj" in err and err.count("\n") == 1
    os.rename(tmp_path / "adapter" / "adapter_model.safetensors", tmp_path / "adapter" / "adapter_model.bin")
    code, _, err = cli("--store", s, "lora", "merge", str(tmp_path / "base"), str(tmp_path / "adapter"))
    assert code == 4 and "pickle" in err.lower()
    assert not os.path.exists(os.path.join(s, "artifacts")) or Store(s).list() == []
