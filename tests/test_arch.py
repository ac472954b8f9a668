"""Model structure as data: roles, layers, head axes and query-head groups from config.json."""
import pytest

from tensorstore_llm.arch import Architecture, TensorRole
from tensorstore_llm.errors import FormatError
from tensorstore_llm.io.hf_dir import HFCheckpointSource

LLAMA = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 8,
         "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 500}


def test_roles_of_a_generated_llama_cover_every_tensor(tiny_family):
    arch = Architecture.from_dir(tiny_family["base"])
    with HFCheckpointSource(tiny_family["base"]) as src:
        roles = arch.roles(src.keys())
        metas = {m.name: m for m in src.metas()}
    assert all(r.role != "other" for r in roles.values()), [n for n, r in roles.items() if r.role == "other"]
    for name, role in roles.items():
        if role.unit is None:
            continue
        count = {"q_head": arch.num_heads, "kv_head": arch.num_kv_heads, "channel": arch.intermediate_size}[role.unit]
        size = metas[name].shape[role.axis]
        assert arch.unit_slice(role, count - 1).stop == size, name   # the units tile the axis exactly


def test_smollm2_config_gqa_groups():
    arch = Architecture.from_config({"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
                                     "num_attention_heads": 9, "num_key_value_heads": 3,
                                     "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True})
    assert arch.group_size == 3 and arch.head_dim == 64
    assert list(arch.query_heads_of(2)) == [6, 7, 8]
    assert arch.role("model.layers.29.mlp.down_proj.weight") == TensorRole("down", 29, 1, "channel")
    assert arch.role("model.layers.3.self_attn.o_proj.weight") == TensorRole("o", 3, 1, "q_head")
    assert arch.unit_slice(arch.role("model.layers.0.self_attn.k_proj.weight"), 1) == slice(64, 128)
    assert arch.role("model.embed_tokens.weight").role == "embed"
    assert arch.role("lm_head.weight").role == "lm_head" and arch.role("model.norm.weight").role == "final_norm"
    assert arch.role("model.layers.1.input_layernorm.weight") == TensorRole("norm", 1)


def test_qwen2_biases_and_gemma3_nested_config():
    qwen = Architecture.from_config({**LLAMA, "model_type": "qwen2"})
    assert qwen.role("model.layers.0.self_attn.q_proj.bias") == TensorRole("q", 0, 0, "q_head", "bias")
    gemma = Architecture.from_config({"model_type": "gemma3", "text_config": {**LLAMA, "model_type": "gemma3_text",
                                                                              "head_dim": 32}})
    assert gemma.family == "gemma3_text" and gemma.head_dim == 32
    assert gemma.role("model.layers.2.self_attn.q_norm.weight") == TensorRole("norm", 2)
    assert gemma.role("model.layers.2.pre_feedforward_layernorm.weight").role == "norm"
    assert Architecture.from_config({**LLAMA, "model_type": "mistral"}).role("model.layers.1.mlp.up_proj.weight").unit == "channel"


def test_unknown_or_inconsistent_layouts_are_clear_errors(tmp_path):
    with pytest.raises(FormatError, match="'gpt2' is not a known layout; known: .*llama"):
        Architecture.from_config({**LLAMA, "model_type": "gpt2"})
    with pytest.raises(FormatError, match="do not split into 3 key-value groups"):
        Architecture.from_config({**LLAMA, "num_key_value_heads": 3})
    with pytest.raises(FormatError, match="cannot read the model's sizes"):
        Architecture.from_config({"model_type": "llama"})
    with pytest.raises(FormatError, match="no config.json"):
        Architecture.from_dir(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="unreadable"):
        Architecture.from_dir(str(tmp_path))
    assert Architecture.from_config(LLAMA).role("model.layers.0.mlp.experts.0.w1.weight").role == "other"
