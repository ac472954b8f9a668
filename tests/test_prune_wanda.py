"""Wanda (activation-aware) pruning on the real SmolLM2-135M: the structured channel scores and the
unstructured mask against a direct torch formula with norms taken from other modules' outputs."""
from __future__ import annotations

import os

import pytest
import torch

# ~45 s on a quiet 2-core machine (both real-model files); TSLLM_SKIP_REAL=1 skips them
pytestmark = pytest.mark.skipif(bool(os.environ.get("TSLLM_SKIP_REAL")), reason="TSLLM_SKIP_REAL is set")
transformers = pytest.importorskip("transformers")

from tensorstore_llm import api  # noqa: E402
from tensorstore_llm.prune import prune  # noqa: E402
from tensorstore_llm.prune.calibrate import token_blocks  # noqa: E402

from helpers import smollm2_or_skip  # noqa: E402

TEXT = "Wanda scores each weight by its magnitude times the norm of the input feature it multiplies. " * 12


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_or_skip("bfloat16")


def _reference_norms(path, corpus, layer):
    """‖x‖ of the inputs of gate/up (post-attention norm output) and down (act(gate)·up) of ``layer``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    blocks = token_blocks(tokenizer, [corpus], 32, 2)
    mlp = model.model.layers[layer].mlp
    seen = []
    norm = model.model.layers[layer].post_attention_layernorm
    hook = norm.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        for row in blocks:
            model(input_ids=row[None])
    hook.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    h = torch.nn.functional.silu(x @ mlp.gate_proj.weight.double().T) * (x @ mlp.up_proj.weight.double().T)
    return model, x.norm(dim=0), h.norm(dim=0)


def test_wanda_scores_and_mask_match_the_formula(smollm2, store, tmp_path):
    api.import_checkpoint(smollm2, store, name="base", progress=False)
    corpus = tmp_path / "calib.txt"
    corpus.write_text(TEXT)
    structured = prune(store, "base", method="wanda", ratio=0.5, calibration=str(corpus), calibration_samples=2,
                       seq_len=32, keep_first=1, keep_last=28, name="w", progress=False)
    model, x_norm, h_norm = _reference_norms(smollm2, TEXT, 1)
    mlp = model.model.layers[1].mlp
    score = (mlp.gate_proj.weight.double().abs() @ x_norm + mlp.up_proj.weight.double().abs() @ x_norm
             + (mlp.down_proj.weight.double().abs() * h_norm).sum(0))
    want = set(torch.sort(score, descending=True, stable=True).indices[:768].tolist())
    got = set(structured.plan.kept_channels(1))
    assert len(got) == 768 and len(got ^ want) <= 4     # ties within fp rounding of two summation orders
    assert structured.plan.kept_channels(0) == tuple(range(1536))
    masked = prune(store, "base", method="wanda", pattern="unstructured", ratio=0.5, calibration=str(corpus),
                   calibration_samples=2, seq_len=32, name="wu", progress=False)
    norm = masked.plan.norms["model.layers.1.mlp.up_proj"].double()
    assert torch.allclose(norm, x_norm, rtol=1e-4)
    with store.open("base") as base, store.open("wu") as out:
        w = base.read("model.layers.1.mlp.up_proj.weight")
        s = w.double().abs() * norm
        top = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :288]
        keep = torch.zeros_like(s, dtype=torch.bool).scatter(1, top, True)
        assert torch.equal(out.read("model.layers.1.mlp.up_proj.weight"), torch.where(keep, w, torch.zeros_like(w)))
