"""`tsllm lora merge --base-quant nf4`, streamed: equals the in-memory QLoRA merge
(`lora.api.merge_adapter`, whole tensors through `lora.nf4`) bit for bit under any row blocking,
reports the same ‖q‖/‖Δ‖, and holds about --max-memory of tensor data whatever the model's size."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft", reason="PEFT is not installed (pip install -e .[test]); QLoRA merge tests skipped")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from safetensors.torch import load_file  # noqa: E402

from tensorstore_llm.errors import RecipeError  # noqa: E402
from tensorstore_llm.lora import nf4 as N  # noqa: E402
from tensorstore_llm.lora.api import merge_adapter  # noqa: E402
from tensorstore_llm.lora.qlora import qlora_merge  # noqa: E402
from tensorstore_llm.store import Store  # noqa: E402
from tensorstore_llm.testing.qlora_fixtures import write_adapter, write_base  # noqa: E402

# odd sizes: rows that are not whole 64-blocks, tensors that end in a partial block (97 x 48, 99 x 48)
SIZES = dict(vocab_size=97, hidden_size=48, intermediate_size=99, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False)
CASES = {
    "plain-embedding": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj",
                                                               "embed_tokens"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "gate_proj", "down_proj"]),
}


def _base(path, sizes=SIZES, seed=0):
    write_base(path, sizes, seed)


def _adapter(base, path, config, dyadic=True):
    write_adapter(base, path, config, dyadic)


def _load(out_dir):
    return load_file(os.path.join(out_dir, "model.safetensors"))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("requantize", [False, True])
def test_streamed_qlora_merge_equals_in_memory_bit_for_bit(tmp_path, cli, case, requantize):
    _base(tmp_path / "base")
    _adapter(tmp_path / "base", tmp_path / "adapter", peft.LoraConfig(**CASES[case]))
    report = merge_adapter(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "ref"), base_quant="nf4",
                           requantize="nf4" if requantize else None)
    expected = _load(tmp_path / "ref")
    extra = ["--requantize", "nf4"] if requantize else []
    for budget in ("64M", "24K"):                  # whole tensors, then row blocks cutting 64-blocks
        out = tmp_path / f"out-{budget}"
        code, _, err = cli("-q", "--store", tmp_path / "store", "lora", "merge", tmp_path / "base",
                           tmp_path / "adapter", "--base-quant", "nf4", *extra, "--max-memory", budget, "-o", out)
        assert code == 0, err
        merged = _load(out)
        assert set(merged) == set(expected)
        for name, value in expected.items():
            assert torch.equal(merged[name], value), (case, requantize, budget, name)
    result = qlora_merge(Store(str(tmp_path / "store")), str(tmp_path / "base"), str(tmp_path / "adapter"),
                         requantize=requantize, max_memory="24K", progress=False)
    assert max(j.blocks for j in result.estimate.jobs) > 1        # the tensors were split into row blocks
    assert set(result.analysis["modules"]) == set(report["modules"])
    for module, info in report["modules"].items():
        mine = result.analysis["modules"][module]
        assert mine["rank"] == info["rank"] and mine["scaling"] == info["scaling"]
        for key in ("q_over_delta", "requant_error") if requantize else ("q_over_delta",):
            assert mine[key] == pytest.approx(info[key], rel=1e-5), (module, key)


def test_streamed_qlora_merge_against_direct_formula(tmp_path):
    """One module by hand: W' = dequant(NF4(W)) + s·B·A in fp32, rounded once (bf16)."""
    _base(tmp_path / "base")
    _adapter(tmp_path / "base", tmp_path / "adapter", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"]))
    store = Store(str(tmp_path / "store"))
    result = qlora_merge(store, str(tmp_path / "base"), str(tmp_path / "adapter"), max_memory="24K", progress=False)
    base = _load(tmp_path / "base")
    ad = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    A, B = ad[f"base_model.model.{name}.lora_A.weight"], ad[f"base_model.model.{name}.lora_B.weight"]
    w = base[name + ".weight"]
    wq = N.dequantize_nf4(N.quantize_nf4(w)).float()          # whole tensor, bitsandbytes' layout (bf16)
    direct = (wq + (B.float() @ A.float()) * 2.0).to(torch.bfloat16)
    with store.open(result.artifact.id) as src:
        assert torch.equal(src.read(name + ".weight"), direct)
        assert torch.equal(src.read("model.norm.weight"), base["model.norm.weight"])
    q_over_delta = float((w.float() - N.nf4_roundtrip(w).float()).norm() / ((B @ A) * 2.0).norm())
    assert result.analysis["modules"][name]["q_over_delta"] == pytest.approx(q_over_delta, rel=1e-5)
    assert store.get(result.artifact.id).manifest.recipe["base_quant"] == "nf4"


def test_already_quantised_base_is_refused_by_the_streamed_path(tmp_path):
    _base(tmp_path / "base")
    _adapter(tmp_path / "base", tmp_path / "adapter", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    tensors = _load(tmp_path / "base")
    name = "model.layers.0.self_attn.q_proj.weight"
    q = N.quantize_nf4(tensors[name])
    tensors[name] = q.packed
    tensors[name + ".quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{}"), dtype=torch.uint8)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "base" / "model.safetensors"))
    store = Store(str(tmp_path / "store"))
    with pytest.raises(RecipeError, match="already quantised"):
        qlora_merge(store, str(tmp_path / "base"), str(tmp_path / "adapter"), progress=False)
    assert store.list() == []


PEAK = """
import sys
sys.path.insert(0, sys.argv[1])
from rss_probe import run_measured
import json
p = run_measured(sys.argv[2:])
print(json.dumps({"rc": p.returncode, "peak": p.maxrss_mib, "err": p.stderr[-500:]}))
"""


def _peak(cmd: list[str]) -> dict:
    import json

    bench = os.path.join(os.path.dirname(__file__), "benchmarks")
    out = subprocess.run([sys.executable, "-c", PEAK, bench, *cmd], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_streamed_qlora_merge_peak_rss_is_bounded(tmp_path):
    """A ~90 MB bf16 model merged at --max-memory 16M: above its interpreter and torch the process
    holds ~16 MiB of blocks plus the runtime, less than the model (the in-memory path holds a
    whole shard and its copies)."""
    sizes = dict(vocab_size=12000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, tie_word_embeddings=False)
    _base(tmp_path / "base", sizes)
    _adapter(tmp_path / "base", tmp_path / "adapter",
             peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"]))
    model_mib = os.path.getsize(tmp_path / "base" / "model.safetensors") / 2**20
    baseline = _peak([sys.executable, "-c", "import torch, tensorstore_llm_cli, tensorstore_llm.lora.qlora"])
    streamed = _peak([sys.executable, "-m", "tensorstore_llm_cli", "-q", "--store", str(tmp_path / "store"), "lora",
                      "merge", str(tmp_path / "base"), str(tmp_path / "adapter"), "--base-quant", "nf4",
                      "--max-memory", "16M"])
    assert streamed["rc"] == 0, streamed["err"]
    held = streamed["peak"] - baseline["peak"]
    assert model_mib > 80
    # 16 MiB of blocks + the runtime (code pages, thread arenas, per-block NF4 statistics) < 100 MiB
    assert held < 100 and held < model_mib, (held, model_mib, streamed, baseline)


def test_cli_sends_an_already_quantised_base_to_the_in_memory_path(tmp_path, cli):
    """A bitsandbytes NF4 checkpoint (quantization_config in config.json): the CLI dequantises it in
    memory into -o DIR, the same bytes as ``merge_adapter``; without -o it says what it needs."""
    import json

    from safetensors.torch import save_file

    _base(tmp_path / "dense")
    _adapter(tmp_path / "dense", tmp_path / "adapter", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    tensors = _load(tmp_path / "dense")
    for layer in range(SIZES["num_hidden_layers"]):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        q = N.quantize_nf4(tensors.pop(name))
        state = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": list(q.shape),
                 "nested_blocksize": 256, "nested_offset": float(q.offset)}
        tensors.update({name: q.packed, name + ".absmax": q.absmax, name + ".quant_map": N.NF4_CODE.clone(),
                        name + ".nested_absmax": q.absmax2, name + ".nested_quant_map": q.code2.clone(),
                        name + ".quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(state).encode()),
                                                                              dtype=torch.uint8)})
    os.makedirs(tmp_path / "bnb")
    save_file(tensors, str(tmp_path / "bnb" / "model.safetensors"))
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (tmp_path / "bnb" / "config.json").write_text(json.dumps(config))
    code, _out, err = cli("--store", tmp_path / "store", "lora", "merge", tmp_path / "bnb", tmp_path / "adapter",
                         "--base-quant", "nf4", "-o", tmp_path / "out")
    assert code == 0, err
    merge_adapter(str(tmp_path / "bnb"), str(tmp_path / "adapter"), str(tmp_path / "ref"), base_quant="nf4")
    merged, expected = _load(tmp_path / "out"), _load(tmp_path / "ref")
    assert set(merged) == set(expected) and all(torch.equal(merged[k], v) for k, v in expected.items())
    assert "model.layers.0.self_attn.q_proj.weight.absmax" not in merged
    code, _, err = cli("--store", tmp_path / "store", "lora", "merge", tmp_path / "bnb", tmp_path / "adapter",
                       "--base-quant", "nf4")
    assert code == 2 and "-o DIR" in err


def test_qlora_merge_into_a_directory_writes_once(tmp_path, cli):
    """-o streams the dense NF4 merge straight into DIR (the store keeps only a tensorless export
    record); --keep-artifact stores the checkpoint too, with the same bytes in DIR."""
    _base(tmp_path / "base")
    _adapter(tmp_path / "base", tmp_path / "adapter", peft.LoraConfig(**CASES[sorted(CASES)[0]]))
    outputs = {}
    for mode, extra in (("once", []), ("kept", ["--keep-artifact"])):
        store = tmp_path / f"store-{mode}"
        code, _, err = cli("-q", "--store", store, "lora", "merge", tmp_path / "base", tmp_path / "adapter",
                           "--base-quant", "nf4", "--max-memory", "64M", "-o", tmp_path / mode, *extra)
        assert code == 0, err
        outputs[mode] = _load(tmp_path / mode)
        kinds = sorted(a.kind for a in Store(str(store)).list())
        assert kinds == (["export"] if mode == "once" else ["checkpoint"]), (mode, kinds)
        if mode == "once":
            record = Store(str(store)).list()[0]
            assert not record.manifest.tensors and record.manifest.recipe["base_quant"] == "nf4"
    assert set(outputs["once"]) == set(outputs["kept"])
    for name, value in outputs["kept"].items():
        assert torch.equal(outputs["once"][name], value), name
