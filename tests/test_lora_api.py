"""merge_adapter over safetensors checkpoint directories (the in-memory path) against PEFT and
against dequantise-then-merge formulas for NF4 / GPTQ bases."""
from __future__ import annotations

import json
import os

import pytest
import torch

peft = pytest.importorskip("peft", reason="PEFT is not installed (pip install -e .[test]); merge_adapter tests skipped")
transformers = pytest.importorskip("transformers", reason="transformers is not installed; merge_adapter tests skipped")

from safetensors.torch import load_file, save_file  # noqa: E402

from tensorstore_llm.errors import OutputExists, RecipeError, ShapeMismatch, TensorNotFound, UnsafeFormat  # noqa: E402
from tensorstore_llm.lora import nf4 as N  # noqa: E402
from tensorstore_llm.lora.api import merge_adapter  # noqa: E402
from tensorstore_llm.lora.peft_format import read_adapter  # noqa: E402

from helpers import dir_tensors, random_peft_adapter, tiny_llama  # noqa: E402


@pytest.mark.parametrize("sharded", [False, True])
def test_merge_adapter_equals_peft_and_loads_in_transformers(tmp_path, sharded):
    tiny_llama().save_pretrained(tmp_path / "base", max_shard_size="40KB" if sharded else "5GB")
    assert os.path.isfile(tmp_path / "base" / ("model.safetensors.index.json" if sharded else "model.safetensors"))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=sharded,
                          modules_to_save=["lm_head"], rank_pattern={"down_proj": 2})
    pm = random_peft_adapter(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                             tmp_path / "adapter", cfg)
    ref = pm.merge_and_unload()
    report = merge_adapter(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"))
    assert report["modules"]["model.layers.1.mlp.down_proj"]["rank"] == 2
    assert "lm_head.weight" in report["changed"]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "base"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for name, t in ref.state_dict().items():
        assert torch.equal(merged.state_dict()[name], t), name
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, ref(ids).logits)


def test_bad_inputs_write_nothing(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    random_peft_adapter(tiny_llama(), tmp_path / "adapter", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    merge_adapter(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"))
    with pytest.raises(OutputExists):
        merge_adapter(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"))
    # a base of another architecture: the target's shape does not fit
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(tmp_path / "other")
    with pytest.raises(ShapeMismatch, match="q_proj"):
        merge_adapter(str(tmp_path / "other"), str(tmp_path / "adapter"), str(tmp_path / "out2"))
    # a base missing a target module
    sd = load_file(str(tmp_path / "base" / "model.safetensors"))
    del sd["model.layers.1.self_attn.q_proj.weight"]
    os.makedirs(tmp_path / "cut")
    save_file(sd, str(tmp_path / "cut" / "model.safetensors"))
    with pytest.raises(TensorNotFound, match=r"model\.layers\.1\.self_attn\.q_proj"):
        merge_adapter(str(tmp_path / "cut"), str(tmp_path / "adapter"), str(tmp_path / "out3"))
    # pickle bases are refused
    os.makedirs(tmp_path / "pickled")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(UnsafeFormat):
        merge_adapter(str(tmp_path / "pickled"), str(tmp_path / "adapter"), str(tmp_path / "out4"))
    # prefix tuning cannot be merged
    prefix = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    prefix.save_pretrained(str(tmp_path / "prefix"))
    with pytest.raises(RecipeError, match="cannot be merged"):
        merge_adapter(str(tmp_path / "base"), str(tmp_path / "prefix"), str(tmp_path / "out5"))
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(("out2", "out3", "out4", "out5", ".merge-"))]
    assert leftovers == []


def test_qlora_merge_into_nf4_dequantised_base_and_reports_q_over_delta(tmp_path):
    tiny_llama(dtype=torch.bfloat16).save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    random_peft_adapter(tiny_llama(dtype=torch.bfloat16), tmp_path / "adapter", cfg)
    report = merge_adapter(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), base_quant="nf4")
    base, out = dir_tensors(tmp_path / "base"), dir_tensors(tmp_path / "out")
    adapter = read_adapter(str(tmp_path / "adapter"))
    for module, m in adapter.modules.items():
        name = module + ".weight"
        wq = N.dequantize_nf4(N.quantize_nf4(base[name]))              # what QLoRA trained against (bf16)
        want = (wq.float() + (m.B.float() @ m.A.float()) * m.scaling).to(torch.bfloat16)
        assert torch.equal(out[name], want), name
        q = base[name].float() - wq.float()
        ratio = float(q.norm() / ((m.B.float() @ m.A.float()) * m.scaling).norm())
        assert report["modules"][module]["q_over_delta"] == pytest.approx(ratio, rel=1e-5)
    assert torch.equal(out["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])


def test_merge_into_gptq_base_dequantises_first(tmp_path):
    """A base whose q_proj is GPTQ-packed: merge = dequantised weight + s B A, written dense, and the
    config loses its quantization_config."""
    from test_lora_nf4 import pack_cols, pack_rows  # tests/ is on sys.path (pytest prepend import mode)

    model = tiny_llama()
    model.save_pretrained(tmp_path / "dense")
    sd = load_file(str(tmp_path / "dense" / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    dense_q = {}
    for layer in range(2):
        m = f"model.layers.{layer}.self_attn.q_proj"
        w = sd.pop(m + ".weight")                                      # out x in = 64 x 64
        q = torch.randint(0, 16, (64, 64), generator=g)                # in x out
        z = torch.randint(1, 16, (2, 64), generator=g)
        s = (torch.rand(2, 64, generator=g) * 0.01 + 1e-3).half()
        sd.update({m + ".qweight": pack_rows(q, 4), m + ".qzeros": pack_cols(z - 1, 4), m + ".scales": s,
                   m + ".g_idx": (torch.arange(64) // 32).int()})
        dense_q[m] = ((q - z.repeat_interleave(32, 0)).float() * s.repeat_interleave(32, 0).float()).T.half()
        del w
    os.makedirs(tmp_path / "gptq")
    save_file(sd, str(tmp_path / "gptq" / "model.safetensors"))
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False}
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(cfg))
    random_peft_adapter(tiny_llama(), tmp_path / "adapter", peft.LoraConfig(r=4, lora_alpha=8,
                                                                            target_modules=["q_proj"]))
    report = merge_adapter(str(tmp_path / "gptq"), str(tmp_path / "adapter"), str(tmp_path / "out"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    adapter = read_adapter(str(tmp_path / "adapter"))
    for m, wq in dense_q.items():
        lm = adapter.modules[m]
        want = (wq.float() + (lm.B.float() @ lm.A.float()) * lm.scaling).half()
        assert torch.equal(out[m + ".weight"], want)
        assert m + ".qweight" not in out
    assert sorted(report["dequantized"]) == sorted(m + ".weight" for m in dense_q)
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_pissa_dirs_reproduce_the_base_model_in_peft(tmp_path):
    """Residual base + PiSSA adapter, loaded by PEFT, gives the original model's logits (fp32)."""
    from tensorstore_llm.lora.api import svd_init_dirs

    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    dirs = svd_init_dirs(str(tmp_path / "base"), str(tmp_path / "residual"), str(tmp_path / "pissa"), rank=8,
                         targets=["q_proj", "down_proj"], alpha=16.0)
    assert dirs == [str(tmp_path / "pissa")]
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    residual = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "residual").eval()
    with torch.no_grad():
        want, alone = model(ids).logits, residual(ids).logits
    assert (alone - want).abs().max() > 1e-3          # the residual alone lacks the top-r part
    pm = peft.PeftModel.from_pretrained(residual, str(tmp_path / "pissa")).eval()
    with torch.no_grad():
        got = pm(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_extract_and_resize_dirs_round_trip_through_peft(tmp_path):
    from tensorstore_llm.lora.api import extract_adapter_dir, resize_adapter_dir

    tiny_llama().save_pretrained(tmp_path / "base")
    true_cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    random_peft_adapter(tiny_llama(), tmp_path / "true", true_cfg)
    merge_adapter(str(tmp_path / "base"), str(tmp_path / "true"), str(tmp_path / "ft"))
    report = extract_adapter_dir(str(tmp_path / "base"), str(tmp_path / "ft"), str(tmp_path / "extracted"), rank=4,
                                 targets=["q_proj", "v_proj"])
    assert report["totals"]["captured"] > 1 - 1e-5
    again = merge_adapter(str(tmp_path / "base"), str(tmp_path / "extracted"), str(tmp_path / "ft2"))
    a, b = dir_tensors(tmp_path / "ft"), dir_tensors(tmp_path / "ft2")
    for name in again["changed"]:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    rep = resize_adapter_dir(str(tmp_path / "extracted"), str(tmp_path / "small"), rank=2)
    assert all(v["rank"] == 2 for v in rep["modules"].values())
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "small"))
    assert pm.peft_config["default"].r == 2


def test_combine_and_drop_dirs_load_in_peft(tmp_path):
    from tensorstore_llm.lora.api import combine_adapter_dirs, drop_adapter_dir

    tiny_llama().save_pretrained(tmp_path / "base")
    cfg = lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])  # noqa: E731
    random_peft_adapter(tiny_llama(), tmp_path / "a", cfg(), seed=1)
    random_peft_adapter(tiny_llama(), tmp_path / "b", cfg(), seed=2)
    exact = combine_adapter_dirs([str(tmp_path / "a"), str(tmp_path / "b")], [0.5, 0.5], str(tmp_path / "ab"))
    assert all(v["rank"] == 8 for v in exact["modules"].values())
    cut = combine_adapter_dirs([str(tmp_path / "a"), str(tmp_path / "b")], [0.5, 0.5], str(tmp_path / "ab3"), rank=3)
    assert all(v["rank"] == 3 and 0 < v["relative_error"] < 1 for v in cut["modules"].values())
    assert peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ab3")).peft_config["default"].r == 3
    # the exact combination, merged, equals the two adapters merged at half scale each
    merge_adapter(str(tmp_path / "base"), str(tmp_path / "ab"), str(tmp_path / "m_ab"))
    merge_adapter(str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "m_a"), scale=0.5)
    merge_adapter(str(tmp_path / "m_a"), str(tmp_path / "b"), str(tmp_path / "m_a_b"), scale=0.5)
    x, y = dir_tensors(tmp_path / "m_ab"), dir_tensors(tmp_path / "m_a_b")
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-6)
    rep = drop_adapter_dir(str(tmp_path / "a"), str(tmp_path / "a_top"), lowest=1)
    assert rep["totals"]["params_removed"] == (4 * 64 + 64 * 4) + (4 * 64 + 32 * 4)   # q, v of layer 0 (kv width 32)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a_top"))
    names = [n for n, _ in pm.named_parameters() if "lora_A" in n]
    assert names and all("layers.1." in n for n in names)
