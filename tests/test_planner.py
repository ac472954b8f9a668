"""The memory planner against the seed's worked example and direct counts; `tsllm plan` reads a config only."""
from __future__ import annotations

import json

import pytest

from tensorstore_llm.arch import Architecture
from tensorstore_llm.errors import InvalidParameter
from tensorstore_llm.planner import PlanSettings, estimate, parameter_counts

# a 3B-parameter Llama shape: 24 layers, hidden 2048 as in the seed's example
CONFIG_3B = {"model_type": "llama", "num_hidden_layers": 24, "hidden_size": 2048, "num_attention_heads": 16,
             "num_key_value_heads": 16, "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False}


def test_full_finetune_terms_match_the_seed():
    arch = Architecture.from_config(CONFIG_3B)
    e = estimate(arch, "full", PlanSettings(batch=8, seq_len=1024, dtype="fp16", grad_checkpointing=True))
    p = e.params
    assert 2.9e9 < p < 3.2e9, p
    assert e.weights == 2 * p and e.gradients == 2 * p          # 6 GB + 6 GB for ~3B in fp16
    assert e.optimizer == 12 * p                                  # AdamW + fp32 master: 36 GB for 3B
    # activations with full recomputation: layers * batch * seq * hidden * 2 bytes (+ the fp32 logits)
    assert e.activations == 24 * 8 * 1024 * 2048 * 2 + 8 * 1024 * 128256 * 4


def test_lora_counts_and_zero_sharding():
    arch = Architecture.from_config(CONFIG_3B)
    s = PlanSettings(lora_rank=8, lora_targets=("q", "v"))
    e = estimate(arch, "lora", s)
    assert e.trainable == 24 * 8 * ((2048 + 2048) * 2)
    assert e.gradients == 4 * e.trainable and e.optimizer == 8 * e.trainable
    full = estimate(arch, "full", PlanSettings(zero=3, gpus=4))
    one = estimate(arch, "full", PlanSettings())
    assert full.weights == one.weights // 4 and full.optimizer == one.optimizer // 4
    loram = estimate(arch, "loram", PlanSettings(prune_ratio=0.5))
    assert loram.params == sum(parameter_counts(arch, inter=7168).values())
    q = estimate(arch, "qlora", PlanSettings())
    counts = parameter_counts(arch)
    assert q.weights == int(counts["linear"] * 0.5625) + 2 * (counts["embed"] + counts["norm"])   # NF4 + absmax


def test_cli_reads_only_the_config(cli, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG_3B))
    code, out, err = cli("plan", tmp_path, "--batch", "2", "--seq-len", "512", "--grad-checkpointing")
    assert code == 0, err
    assert [line.split()[0] for line in out.strip().splitlines()] == ["method", "full", "lora", "qlora", "loram"]
    code, _, err = cli("plan", tmp_path, "--zero", "5")
    assert code == 7
    with pytest.raises(InvalidParameter):
        PlanSettings(prune_ratio=1.0)
