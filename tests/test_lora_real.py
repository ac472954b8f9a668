"""LoRA merge on the real SmolLM2-135M against PEFT, with adapters trained a few steps in the test."""
from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft",
                           reason="PEFT is not installed (pip install -e .[test]); real-model LoRA test skipped")
pytest.importorskip("transformers", reason="transformers is not installed; real-model LoRA test skipped")

from tensorstore_llm.errors import FormatError  # noqa: E402
from tensorstore_llm.lora.merge import merge_state_dict  # noqa: E402
from tensorstore_llm.lora.peft_format import read_adapter  # noqa: E402

from helpers import smollm2_or_skip  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    """(checkpoint path, fp32 state dict) of the real SmolLM2-135M."""
    path = smollm2_or_skip("bfloat16")
    return path, {k: v.clone() for k, v in _load(path).state_dict().items()}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _train(model, config, steps=2, seed=0):
    """A few real optimisation steps of ``config`` on a short random token sequence (kept short:
    the default suite runs on two shared cores)."""
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, config)
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-3)
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return pm.eval()


@pytest.mark.parametrize("kind", ["plain_patterns", "dora_rslora"])
def test_merge_equals_peft_on_smollm2_with_trained_adapter(smollm2, kind, tmp_path):
    if kind == "plain_patterns":
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                 rank_pattern={"o_proj": 4, "layers.3.self_attn.q_proj": 2},
                                 alpha_pattern={"down_proj": 4}, modules_to_save=["model.norm"])
    else:
        config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, use_dora=True,
                                 target_modules=["k_proj", "up_proj"], layers_to_transform=[0, 1, 2, 3])
    path, base = smollm2
    pm = _train(_load(path), config, steps=2 if kind == "plain_patterns" else 1)
    pm.save_pretrained(str(tmp_path / "adapter"))
    reference = pm.merge_and_unload().state_dict()

    adapter = read_adapter(str(tmp_path / "adapter"))
    merged = merge_state_dict(base, adapter)
    trained = sum(1 for m in adapter.modules.values() if m.B.abs().max() > 0)
    assert trained == len(adapter.modules), "training left some lora_B at zero"
    if kind == "dora_rslora":
        assert len(adapter.modules) == 8 and all(m.magnitude is not None for m in adapter.modules.values())
    else:
        assert adapter.ranks()["model.layers.3.self_attn.q_proj"] == 2
        assert adapter.ranks()["model.layers.5.self_attn.o_proj"] == 4
        assert "model.norm.weight" in merged
    for name, ref in reference.items():
        ours = merged.get(name, base[name])
        assert torch.equal(ours, ref), f"{name}: max diff {(ours - ref).abs().max()}"


def test_extract_from_a_real_finetune_approaches_its_logits_as_rank_grows(tmp_path):
    """`lora extract` on the real SmolLM2-135M fine-tune (testing.finetune): the captured energy
    is reported and grows with r, and the merged extraction's logits move towards the fine-tune's."""
    from tensorstore_llm.lora.artifacts import read_adapter_artifact
    from tensorstore_llm.lora.jobs import extract
    from tensorstore_llm.store import Store
    from tensorstore_llm.testing.finetune import smollm2_finetune
    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    try:
        base_dir, ft_dir = smollm2_checkpoint("bfloat16"), smollm2_finetune()
    except FormatError as e:
        pytest.skip(f"SmolLM2-135M is not available: {e}")
    store = Store(str(tmp_path / "store"))
    base_model, ft_model = _load(base_dir), _load(ft_dir)
    base_sd = {k: v.clone() for k, v in base_model.state_dict().items()}
    ids = torch.randint(0, base_model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = ft_model(input_ids=ids).logits
        gaps, captured = [], []
        for r in (4, 64):       # every linear layer and the (tied) embedding, as PEFT would target them
            result = extract(store, ft_dir, base_dir, rank=r, progress=False,
                             targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                      "embed_tokens"])
            captured.append(result.report["totals"]["captured"])
            assert all(0 < m["captured"] <= 1 for m in result.report["modules"].values())
            adapter, _ = read_adapter_artifact(store, result.artifacts[0].id)
            base_model.load_state_dict({**base_sd, **merge_state_dict(base_sd, adapter)})
            gaps.append(float((base_model(input_ids=ids).logits - target).norm()))
        base_model.load_state_dict(base_sd)
        start = float((base_model(input_ids=ids).logits - target).norm())
    assert captured[0] < captured[1] <= 1
    assert start > gaps[0] > gaps[1], (start, gaps)
    assert adapter.modules["model.embed_tokens"].kind == "embedding"
