"""LoRA adapters against PEFT: reading PEFT's files, merging like ``merge_and_unload()``, writing
adapters PEFT loads back, and the errors for adapters that cannot be used."""
from __future__ import annotations

import json
import os

import pytest
import torch

peft = pytest.importorskip("peft", reason="PEFT is not installed (pip install -e .[test]); LoRA PEFT tests skipped")
transformers = pytest.importorskip("transformers", reason="transformers is not installed; LoRA PEFT tests skipped")

from tensorstore_llm.errors import FormatError, RecipeError, ShapeMismatch, TensorNotFound, UnsafeFormat  # noqa: E402
from tensorstore_llm.lora.merge import merge_state_dict  # noqa: E402
from tensorstore_llm.lora.peft_format import (  # noqa: E402
    LoraAdapter,
    PrefixAdapter,
    build_adapter,
    read_adapter,
    split_peft_key,
    write_adapter,
)


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=80, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


def peft_adapter(model, config, path, seed=1):
    """Wrap ``model`` with PEFT, give every adapter parameter random values (so the merge is not
    a no-op and DoRA magnitudes differ from the weight norms), save it; returns the PeftModel."""
    pm = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(path))
    return pm


CASES = {
    "plain": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "up_proj"]),
    "patterns": lambda: peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"],
        rank_pattern={"layers.0.self_attn.q_proj": 2, "o_proj": 6},
        alpha_pattern={"k_proj": 3, "layers.1.self_attn.o_proj": 5}),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "gate_proj"]),
    "embedding": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "embedding_dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens"]),
    "modules_to_save": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"],
                                               modules_to_save=["lm_head"]),
}


def _assert_merge_equals_peft(model_fn, config, tmp_path):
    base = {k: v.clone() for k, v in model_fn().state_dict().items()}
    pm = peft_adapter(model_fn(), config, tmp_path / "adapter")
    reference = pm.merge_and_unload().state_dict()
    adapter = read_adapter(str(tmp_path / "adapter"))
    merged = merge_state_dict(base, adapter)
    assert merged, "the adapter changed nothing"
    changed = 0
    for name, ref in reference.items():
        ours = merged.get(name, base[name])
        assert ours.dtype == ref.dtype, name
        assert torch.equal(ours, ref), f"{name}: max diff {(ours.float() - ref.float()).abs().max()}"
        changed += not torch.equal(ref, base[name])
    assert changed == len(merged)
    return adapter


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_equals_peft_merge_and_unload_tiny_llama(case, tmp_path):
    adapter = _assert_merge_equals_peft(tiny_llama, CASES[case](), tmp_path)
    if case == "patterns":
        assert adapter.ranks()["model.layers.0.self_attn.q_proj"] == 2
        assert adapter.ranks()["model.layers.1.self_attn.q_proj"] == 4
        assert adapter.ranks()["model.layers.1.self_attn.o_proj"] == 6
        assert adapter.modules["model.layers.0.self_attn.k_proj"].scaling == 3 / 4
        assert adapter.modules["model.layers.1.self_attn.o_proj"].scaling == 5 / 6
    if case == "rslora":
        assert adapter.modules["model.layers.0.self_attn.q_proj"].scaling == 6 / 2
    if case.startswith("embedding"):
        assert adapter.modules["model.embed_tokens"].kind == "embedding"


def test_merge_equals_peft_fan_in_fan_out_gpt2(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    adapter = _assert_merge_equals_peft(tiny_gpt2, cfg, tmp_path)
    m = adapter.modules["transformer.h.0.attn.c_attn"]
    assert m.transpose and m.base_shape == (32, 96)


def test_merge_equals_peft_lora_bias_gpt2(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True)
    adapter = _assert_merge_equals_peft(tiny_gpt2, cfg, tmp_path)
    assert adapter.modules["transformer.h.1.attn.c_attn"].bias is not None


def test_merge_equals_peft_dora_fan_in_fan_out_gpt2(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)
    _assert_merge_equals_peft(tiny_gpt2, cfg, tmp_path)


def test_bf16_base_peft_compat_and_single_rounding(tmp_path):
    """A bf16 model with a bf16 adapter: PEFT rounds the delta to bf16 before adding; peft_compat
    reproduces that bit for bit, the default rounds once (closer to the fp32 result)."""
    model = tiny_llama().to(torch.bfloat16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peft_adapter(model, CASES["embedding"](), tmp_path / "a")
    ref = pm.merge_and_unload().state_dict()
    adapter = read_adapter(str(tmp_path / "a"))
    compat = merge_state_dict(base, adapter, peft_compat=True)
    once = merge_state_dict(base, adapter)
    for name, t in compat.items():
        assert torch.equal(t, ref[name]), name
        m = adapter.modules[name[: -len(".weight")]]
        exact = base[name].float() + (m.B.float() @ m.A.float()).T.mul(m.scaling) if m.transpose else \
            base[name].float() + (m.B.float() @ m.A.float()).mul(m.scaling)
        assert torch.equal(once[name], exact.to(torch.bfloat16)), name


def test_scale_option_scales_the_update(tmp_path):
    base = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    peft_adapter(tiny_llama(), CASES["plain"](), tmp_path / "a")
    adapter = read_adapter(str(tmp_path / "a"))
    half = merge_state_dict(base, adapter, scale=0.5)
    full = merge_state_dict(base, adapter)
    name = "model.layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(half[name] - base[name], 0.5 * (full[name] - base[name]), rtol=1e-5, atol=1e-6)


def test_round_trip_write_loads_in_peft_with_same_logits(tmp_path):
    """read -> write gives an adapter PEFT loads with identical logits (DoRA, embedding, patterns,
    modules_to_save all at once)."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"],
                          rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}, modules_to_save=["lm_head"])
    pm = peft_adapter(tiny_llama(), cfg, tmp_path / "orig")
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = pm(ids).logits
    adapter = read_adapter(str(tmp_path / "orig"))
    info = adapter.describe()
    assert info["dora"] and info["embedding_modules"] == ["model.embed_tokens"]
    assert info["modules_to_save"] == ["lm_head.weight"] and info["ranks"]["model.layers.0.self_attn.v_proj"] == 2
    assert info["num_params"] == sum(p.numel() for n, p in pm.named_parameters()
                                     if "lora_" in n or "modules_to_save.default" in n)
    write_adapter(adapter, str(tmp_path / "copy"))
    again = read_adapter(str(tmp_path / "copy"))
    assert again.ranks() == adapter.ranks()
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "copy")).eval()
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.equal(before, after)


def test_built_adapter_loads_in_peft_and_applies_exact_delta(tmp_path):
    """build_adapter folds each module's scale into B and writes rank_pattern for odd ranks; PEFT's
    merge of the written adapter adds exactly B @ A (up to fp32 rounding of the folded scale)."""
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    factors = {
        "model.layers.0.self_attn.q_proj": (torch.randn(3, 32, generator=g), torch.randn(32, 3, generator=g)),
        "model.layers.1.self_attn.q_proj": (torch.randn(3, 32, generator=g), torch.randn(32, 3, generator=g)),
        "model.layers.1.mlp.down_proj": (torch.randn(5, 48, generator=g), torch.randn(32, 5, generator=g)),
    }
    write_adapter(build_adapter(factors, alpha=6.0), str(tmp_path / "built"))
    pm = peft.PeftModel.from_pretrained(model, str(tmp_path / "built"))
    ref = pm.merge_and_unload().state_dict()
    for name, (A, B) in factors.items():
        torch.testing.assert_close(ref[name + ".weight"] - base[name + ".weight"], B @ A, rtol=1e-5, atol=1e-5)
    assert torch.equal(ref["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])


def test_prefix_tuning_read_write_and_refused_by_merge(tmp_path):
    cfg = peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=5)
    model = tiny_llama()
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(str(tmp_path / "prefix"))
    adapter = read_adapter(str(tmp_path / "prefix"))
    assert isinstance(adapter, PrefixAdapter)
    assert adapter.describe()["num_params"] == 5 * 64 and adapter.describe()["mergeable"] is False
    assert adapter.prompt_embeddings.shape == (5, 2 * 2 * 16)
    adapter.validate_base(model.config.to_dict())
    with pytest.raises(ShapeMismatch, match="layers"):
        adapter.validate_base({**model.config.to_dict(), "num_hidden_layers": 3})
    write_adapter(adapter, str(tmp_path / "copy"))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "copy")).eval()
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(pm.eval()(ids).logits, loaded(ids).logits)
    with pytest.raises(RecipeError, match="cannot be merged"):
        merge_state_dict(tiny_llama().state_dict(), adapter)


def test_key_mapping():
    assert split_peft_key("base_model.model.model.embed_tokens.lora_embedding_B") == ("model.embed_tokens", "B_emb")
    assert split_peft_key("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector") == \
        ("model.layers.0.mlp.up_proj", "magnitude")
    assert split_peft_key("base_model.model.transformer.h.0.attn.c_attn.lora_B.bias") == \
        ("transformer.h.0.attn.c_attn", "bias")


# ------------------------------------------------------------------ bad input

@pytest.fixture
def saved_adapter(tmp_path):
    peft_adapter(tiny_llama(), CASES["plain"](), tmp_path / "a")
    return tmp_path / "a"


def _rewrite(path, mutate_config=None, mutate_tensors=None):
    from safetensors.torch import load_file, save_file

    if mutate_config:
        cfg = json.loads((path / "adapter_config.json").read_text())
        mutate_config(cfg)
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    if mutate_tensors:
        t = load_file(str(path / "adapter_model.safetensors"))
        mutate_tensors(t)
        save_file(t, str(path / "adapter_model.safetensors"))


def test_pickle_adapter_refused(saved_adapter):
    os.remove(saved_adapter / "adapter_model.safetensors")
    (saved_adapter / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeFormat, match=r"adapter_model\.bin"):
        read_adapter(str(saved_adapter))


def test_rank_zero_refused(saved_adapter):
    _rewrite(saved_adapter, mutate_config=lambda c: c.update(r=0))
    with pytest.raises(FormatError, match="r must be a positive integer"):
        read_adapter(str(saved_adapter))


def test_rank_above_min_out_in_refused(saved_adapter):
    def grow(t):
        k = "base_model.model.model.layers.0.self_attn.v_proj"
        t[k + ".lora_A.weight"] = torch.zeros(40, 32)
        t[k + ".lora_B.weight"] = torch.zeros(16, 40)
    _rewrite(saved_adapter, mutate_config=lambda c: c.update(rank_pattern={"layers.0.self_attn.v_proj": 40}),
             mutate_tensors=grow)
    with pytest.raises(FormatError, match=r"rank 40 of 'model.layers.0.self_attn.v_proj' exceeds min\(out, in\) = 16"):
        read_adapter(str(saved_adapter))


def test_factor_rank_disagreeing_with_config_refused(saved_adapter):
    _rewrite(saved_adapter, mutate_config=lambda c: c.update(r=3))
    with pytest.raises(FormatError, match="configured rank r=3"):
        read_adapter(str(saved_adapter))


def test_missing_target_module_and_bad_shapes_refused(saved_adapter):
    base = tiny_llama().state_dict()
    adapter = read_adapter(str(saved_adapter))
    missing = dict(base)
    del missing["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(TensorNotFound, match=r"model\.layers\.1\.mlp\.down_proj"):
        merge_state_dict(missing, adapter)
    wrong = dict(base)
    wrong["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 48)
    with pytest.raises(ShapeMismatch, match=r"q_proj.lora_A.weight.*\(32, 32\).*\(32, 48\)"):
        merge_state_dict(wrong, adapter)


def test_unsupported_peft_type_refused(saved_adapter):
    _rewrite(saved_adapter, mutate_config=lambda c: c.update(peft_type="IA3"))
    with pytest.raises(FormatError, match="IA3"):
        read_adapter(str(saved_adapter))


def test_write_refuses_existing_output(saved_adapter):
    from tensorstore_llm.errors import OutputExists

    with pytest.raises(OutputExists):
        write_adapter(read_adapter(str(saved_adapter)), str(saved_adapter))
    assert isinstance(read_adapter(str(saved_adapter)), LoraAdapter)


def test_combine_equals_peft_cat_combination_and_linear_shows_cross_terms(tmp_path):
    """Our combination of full deltas equals PEFT's exact ``add_weighted_adapter(..., "cat")``;
    PEFT's ``"linear"`` (weighted A and B separately) differs from it by cross terms."""
    from tensorstore_llm.lora.adapters import combine_adapters

    cfg = lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])  # noqa: E731
    base = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    peft_adapter(tiny_llama(), cfg(), tmp_path / "a", seed=1)
    peft_adapter(tiny_llama(), cfg(), tmp_path / "b", seed=2)
    ours, report = combine_adapters([read_adapter(str(tmp_path / "a")), read_adapter(str(tmp_path / "b"))], [0.6, 0.3])
    assert all(v["rank"] == 8 and v["relative_error"] == 0 for v in report.modules.values())
    merged = merge_state_dict(base, ours)

    def peft_combined(kind):
        pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"), adapter_name="a")
        pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
        pm.add_weighted_adapter(["a", "b"], [0.6, 0.3], adapter_name="ab", combination_type=kind)
        pm.set_adapter("ab")
        pm.delete_adapter("a")
        pm.delete_adapter("b")
        return pm.merge_and_unload().state_dict()
    cat, linear = peft_combined("cat"), peft_combined("linear")
    for name, t in merged.items():
        torch.testing.assert_close(t, cat[name], rtol=1e-5, atol=1e-6)
        assert (linear[name] - t).abs().max() > 1e-4, name


@pytest.mark.parametrize("kw", [
    dict(target_modules=["q_proj", "model.layers.1.mlp.up_proj"]),
    dict(target_modules=r".*layers\.[01]\.self_attn\.(q|v)_proj"),
    dict(target_modules=["q_proj", "v_proj", "down_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]),
])
def test_target_matching_follows_peft(kw):
    from peft.tuners.tuners_utils import check_target_module_exists

    from tensorstore_llm.lora.peft_format import LoraConfig as OurConfig

    theirs = peft.LoraConfig(r=4, **kw)
    ours = OurConfig.from_dict({"r": 4, **kw})
    names = [n for n, _ in tiny_llama().named_modules() if n]
    picked = [n for n in names if ours.targets(n)]
    assert picked, "the config targets nothing"
    assert picked == [n for n in names if bool(check_target_module_exists(theirs, n))]
