"""The LoRAM pipeline on the real SmolLM2-135M: prune 40% of the MLP channels, train a LoRA with
PEFT on the pruned model, recover it, merge it into the full model: the full model's loss on the
training text drops. Also DarwinLM's search on SmolLM2 is no worse than uniform."""
from __future__ import annotations

import os

import pytest
import torch

# ~45 s on a quiet 2-core machine (both real-model files); TSLLM_SKIP_REAL=1 skips them
pytestmark = pytest.mark.skipif(bool(os.environ.get("TSLLM_SKIP_REAL")), reason="TSLLM_SKIP_REAL is set")

peft = pytest.importorskip("peft", reason="PEFT is not installed; the real LoRAM pipeline test is skipped")
transformers = pytest.importorskip("transformers")

from tensorstore_llm import api  # noqa: E402
from tensorstore_llm.loram import recover_adapter  # noqa: E402
from tensorstore_llm.prune import SearchSettings, prune  # noqa: E402

from helpers import smollm2_or_skip  # noqa: E402

TEXT = ("The lighthouse keeper wrote in his log every night: the lamp was lit at dusk, the wind came from the "
        "north-east, three ships passed the point, and the sea was calm until midnight. ") * 6


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_or_skip("bfloat16")


def _loss(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.slow
def test_prune_train_recover_merge_lowers_loss(smollm2, store, tmp_path, cli):
    api.import_checkpoint(smollm2, store, name="base", progress=False)
    pruned_dir = str(tmp_path / "pruned")
    result = prune(store, "base", ratio=0.4, name="small", out_dir=pruned_dir, progress=False)
    assert abs(result.plan.removed_fraction()["mlp_channels"] - 0.4) < 0.01
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :128]
    model = transformers.AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32)
    assert model.config.intermediate_size == 1536 - round(0.4 * 1536)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"], lora_dropout=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        pm = peft.get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-3)
    pm.train()
    for _ in range(8):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    adapter_dir = str(tmp_path / "pruned-lora")
    pm.save_pretrained(adapter_dir)
    recover_adapter(store, adapter_dir, "small-plan", name="full-lora", pruned="small")
    code, _, err = cli("--store", store.root, "lora", "merge", "base", "full-lora", "--name", "tuned",
                       "-o", tmp_path / "tuned")
    assert code == 0, err
    base = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tuned = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "tuned"), dtype=torch.float32).eval()
    before, after = _loss(base, ids), _loss(tuned, ids)
    assert after < before - 0.05, (before, after)


@pytest.mark.slow
def test_search_on_smollm2_is_no_worse_than_uniform(smollm2, store, tmp_path):
    api.import_checkpoint(smollm2, store, name="base", progress=False)
    corpus = tmp_path / "calib.txt"
    corpus.write_text(TEXT * 4)
    settings = SearchSettings(levels=10, generations=1, offspring=3, steps=((2, 1), (1, 2)), seed=0)
    result = prune(store, "base", search=settings, target_ratio=0.3, calibration=str(corpus), calibration_samples=2,
                   seq_len=64, keep_first=26, keep_last=0, name="searched", progress=False)
    found = result.search
    assert found.fitness <= found.uniform_fitness
    assert sum(found.levels) == round(0.3 * 10 * 4)
    recipe = result.plan_artifact.manifest.recipe
    assert recipe["search"]["log"] and recipe["search"]["levels"] == found.levels
