"""`tsllm lora merge --base-quant nf4 --requantize nf4-packed`: a QLoRA merge written as a
bitsandbytes 4-bit checkpoint, streamed. The reference is independent: transformers + bitsandbytes
quantising the dense merge themselves (`from_pretrained(..., quantization_config=BitsAndBytesConfig
(load_in_4bit, nf4, double quant))` then `save_pretrained`); ours must equal that checkpoint tensor
for tensor, load in transformers with the same logits, and dequantise (our reader and bitsandbytes')
to the dense `--requantize nf4` merge."""
from __future__ import annotations

import json
import os

import pytest
import torch

peft = pytest.importorskip("peft", reason="PEFT is not installed (pip install -e .[test]); QLoRA merge tests skipped")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e .[quant]); "
                          "packed NF4 checked against bnb_state tests in test_lora_nf4.py only")

from safetensors.torch import load_file  # noqa: E402

from tensorstore_llm.errors import RecipeError, ShapeMismatch  # noqa: E402
from tensorstore_llm.lora import nf4 as N  # noqa: E402
from tensorstore_llm.lora.api import merge_adapter  # noqa: E402
from tensorstore_llm.lora.qlora import qlora_merge  # noqa: E402
from tensorstore_llm.store import Store  # noqa: E402
from tensorstore_llm.testing.qlora_fixtures import write_adapter, write_base  # noqa: E402

# in_features multiples of 64 (hidden 64, intermediate 192); a vocabulary and lm_head that are not
SIZES = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
CASES = {
    "plain-embedding": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"]},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["k_proj", "gate_proj"]},
}


def _base(path, sizes=SIZES, seed=0):
    write_base(path, sizes, seed)


def _adapter(base, path, config, dyadic=True):
    write_adapter(base, path, config, dyadic)


def _bnb_config():
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.bfloat16)


def _load_4bit(path, **kwargs):
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", **kwargs)
    except (ImportError, RuntimeError, ValueError) as e:    # a transformers / bitsandbytes pair without CPU 4-bit
        pytest.skip(f"transformers does not load bitsandbytes 4-bit models on this CPU ({type(e).__name__}: {e})")


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_merge_equals_transformers_own_4bit_checkpoint(tmp_path, cli, case):
    _base(tmp_path / "base")
    _adapter(tmp_path / "base", tmp_path / "adapter", peft.LoraConfig(**CASES[case]))
    dense_report = merge_adapter(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "dense"),
                                 base_quant="nf4", requantize=None)
    merge_adapter(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "roundtrip"), base_quant="nf4",
                  requantize="nf4")
    reference_model = _load_4bit(tmp_path / "dense", quantization_config=_bnb_config())
    reference_model.save_pretrained(str(tmp_path / "reference"))
    reference = load_file(str(tmp_path / "reference" / "model.safetensors"))
    roundtrip = load_file(str(tmp_path / "roundtrip" / "model.safetensors"))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    ids = torch.tensor([[1, 5, 7, 9, 3, 96]])
    for budget in ("64M", "24K"):                  # whole tensors, then row blocks of a few rows
        out = tmp_path / f"out-{budget}"
        code, _, err = cli("-q", "--store", tmp_path / f"store-{budget}", "lora", "merge", tmp_path / "base",
                           tmp_path / "adapter", "--base-quant", "nf4", "--requantize", "nf4-packed",
                           "--max-memory", budget, "-o", out)
        assert code == 0, err
        ours = load_file(str(out / "model.safetensors"))
        assert set(ours) == set(reference)
        for name, value in reference.items():
            assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), (case, budget, name)
        config, ref_config = (json.loads((d / "config.json").read_text()) for d in (out, tmp_path / "reference"))
        assert config["quantization_config"] == ref_config["quantization_config"]
        # our reader and bitsandbytes' both dequantise it to the dense --requantize nf4 merge (weights the
        # adapter leaves alone: to dequant(NF4(W)))
        for name in [k[: -len(".quant_state.bitsandbytes__nf4")] for k in ours if k.endswith("bitsandbytes__nf4")]:
            expected = roundtrip[name] if name in dense_report["changed"] else N.nf4_roundtrip(base[name])
            mine = N.dequantize_nf4(N.from_bnb_state_dict(ours, name))
            stats = {k[len(name) + 1:]: v for k, v in ours.items() if k.startswith(name + ".")}
            param = bnb.nn.Params4bit.from_prequantized(data=ours[name], quantized_stats=stats, device="cpu")
            theirs = bnb.functional.dequantize_4bit(param.data, param.quant_state)
            assert torch.equal(mine, expected) and torch.equal(theirs, expected), name
    with torch.no_grad():
        assert torch.equal(_load_4bit(tmp_path / "out-24K")(ids).logits, reference_model(ids).logits)
    # the packed checkpoint is itself a base the CLI accepts (dequantised by us, in memory)
    code, _, err = cli("--store", tmp_path / "store-again", "lora", "merge", tmp_path / "out-24K", tmp_path / "adapter",
                       "--base-quant", "nf4", "-o", tmp_path / "again")
    assert code == 0, err
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert not any(k.endswith("bitsandbytes__nf4") for k in again)
    packed_names = [k[: -len(".quant_state.bitsandbytes__nf4")] for k in reference if k.endswith("bitsandbytes__nf4")]
    unchanged = [k for k in packed_names if k not in dense_report["changed"]]
    assert unchanged and all(torch.equal(again[k], N.nf4_roundtrip(base[k])) for k in unchanged)
    # the report: the same ||q|| / ||delta|| as the in-memory path, and the requantisation error
    result = qlora_merge(Store(str(tmp_path / "store-24K")), str(tmp_path / "base"), str(tmp_path / "adapter"),
                         requantize="nf4-packed", max_memory="24K", progress=False)
    assert max(j.blocks for j in result.estimate.jobs) > 1
    dense = load_file(str(tmp_path / "dense" / "model.safetensors"))
    modules = result.analysis["modules"]
    for module, info in dense_report["modules"].items():
        if module.endswith("embed_tokens"):
            assert module not in modules or not modules[module].get("packed")
            continue
        mine = modules[module]
        assert mine["q_over_delta"] == pytest.approx(info["q_over_delta"], rel=1e-5)
        w = module + ".weight"
        adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
        A = adapter[f"base_model.model.{module}.lora_A.weight"].float()
        B = adapter[f"base_model.model.{module}.lora_B.weight"].float()
        delta = (B @ A) * info["scaling"]
        direct = float((dense[w].float() - roundtrip[w].float()).norm() / delta.norm())
        assert mine["requant_error"] == pytest.approx(direct, rel=1e-5), module


def test_packed_merge_refuses_rows_that_are_not_whole_blocks(tmp_path, cli):
    sizes = {**SIZES, "intermediate_size": 100}     # down_proj: in_features 100
    _base(tmp_path / "base", sizes)
    _adapter(tmp_path / "base", tmp_path / "adapter", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    code, _, err = cli("--store", tmp_path / "store", "lora", "merge", tmp_path / "base", tmp_path / "adapter",
                       "--base-quant", "nf4", "--requantize", "nf4-packed", "-o", tmp_path / "out")
    assert code != 0 and "down_proj.weight" in err and "multiple of" in err and "64" in err
    assert not (tmp_path / "out").exists() and Store(str(tmp_path / "store")).list() == []
    with pytest.raises(ShapeMismatch, match="down_proj"):
        qlora_merge(Store(str(tmp_path / "store")), str(tmp_path / "base"), str(tmp_path / "adapter"),
                    requantize="nf4-packed", progress=False)
    code, _, err = cli("--store", tmp_path / "store", "lora", "merge", tmp_path / "base", tmp_path / "adapter",
                       "--requantize", "nf4-packed")
    assert code == 2 and "--base-quant" in err
    with pytest.raises(RecipeError, match="streamed merge"):
        merge_adapter(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "mem"), base_quant="nf4",
                      requantize="nf4-packed")
    assert not os.path.exists(tmp_path / "mem")


def test_kill_during_packed_merge_then_resume_bit_identical(tmp_path, cli):
    """kill -9 after the state tensors and some packed weights are journaled: the re-run resumes
    and gives the artifact (and bytes) of an uninterrupted run."""
    from conftest import kill_after_journal_lines, run_tsllm

    _base(tmp_path / "base")
    _adapter(tmp_path / "base", tmp_path / "adapter", peft.LoraConfig(**CASES["plain-embedding"]))
    root, clean = tmp_path / "store", tmp_path / "clean"
    args = ["--store", root, "lora", "merge", tmp_path / "base", tmp_path / "adapter", "--base-quant", "nf4",
            "--requantize", "nf4-packed", "--max-memory", "16K", "--name", "m"]
    kill_after_journal_lines(args, str(root), lines=14 * 4 + 6)    # 14 packed weights' 4 state tensors, then 6 more
    assert Store(str(root)).list() == []
    rerun = run_tsllm(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert int(rerun.stdout.split("resumed: ")[1].split()[0]) >= 3     # jobs (a packed job journals two tensors)
    code, _, err = cli("--store", clean, *args[2:])
    assert code == 0, err
    resumed, fresh = Store(str(root)), Store(str(clean))
    assert resumed.get("m").id == fresh.get("m").id
    with resumed.open("m") as a, fresh.open("m") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.read(k), b.read(k)) for k in b.keys())
