"""A tokenizer-union merge on a real SmolLM2-135M pair: one model had tokens added and its
embedding resized (as a user does before fine-tuning) and was then fine-tuned on text using them;
the other is a plain SmolLM2 fine-tune. ``tsllm merge -o`` with ``tokenizer_source: union``; the
output loads in transformers, and its weights and logits equal a direct computation: the linear
merge of the two models over the shared vocabulary, the added tokens' rows taken from the only
model that has them (mergekit's rule; 0.5·row + 0.5·filled row = the row).

The same recipe against a whole mergekit run (over a minute on two cores for these 135M models)
is ``tests/benchmarks/bench_tokenizer_union_real.py``.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed: the real SmolLM2 pair cannot be made")

from tensorstore_llm import api
from tensorstore_llm.store import Store

ADDED_SPECIAL = ["<tool_call>", "</tool_call>"]
ADDED_WORDS = ["tensorstore", "zarrification"]
STEPS, LR, SEQ, BATCH = 3, 1e-4, 32, 2


def _tool_text() -> str:
    """Training text that uses the added tokens: standard-library docstrings with a few words
    replaced and each paragraph wrapped in tool-call tags."""
    from tensorstore_llm.testing.finetune import corpus_text

    text = corpus_text(("json", "string")).replace("JSON", "tensorstore").replace("string", "zarrification")
    return "\n\n".join(f"<tool_call>{p}</tool_call>" for p in text.split("\n\n"))


def added_tokens_finetune() -> str:
    """A cached fp32 SmolLM2 with ADDED_SPECIAL / ADDED_WORDS added, its embedding resized
    (transformers' mean resizing, seeded) and STEPS AdamW steps on text using them."""
    from transformers import set_seed

    from tensorstore_llm.testing.finetune import finetune, token_batches
    from tensorstore_llm.testing.real_models import (
        cache_root,
        load_smollm2_fp32,
        save_cached,
    )

    target = os.path.join(cache_root(), f"smollm2-135m-added-tokens-ft{STEPS}-lr{LR:g}-seq{SEQ}x{BATCH}-float32")
    if not os.path.isfile(os.path.join(target, "model.safetensors")):
        model, tokenizer = load_smollm2_fp32()
        tokenizer.add_tokens(ADDED_SPECIAL, special_tokens=True)
        tokenizer.add_tokens(ADDED_WORDS)
        set_seed(0)   # mean resizing draws the new rows from the old rows' normal distribution
        model.resize_token_embeddings(len(tokenizer))
        finetune(model, token_batches(tokenizer, _tool_text(), SEQ, BATCH, STEPS, seed=2), lr=LR)
        save_cached(model, tokenizer, target)
    return target


@pytest.fixture(scope="module")
def union_pair():
    if os.environ.get("TSLLM_SKIP_REAL"):
        pytest.skip("TSLLM_SKIP_REAL is set")
    from test_seed_methods import _task_finetune

    from tensorstore_llm.errors import FormatError
    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    try:
        smollm2_checkpoint("float32")
    except FormatError as e:
        pytest.skip(f"SmolLM2-135M is not available: {e}")
    return {"plain": _task_finetune("b"), "added": added_tokens_finetune()}


def union_recipe(pair) -> str:
    """linear 0.5 / 0.5 over the union, the plain model as base (the union starts from it)."""
    return (f"merge_method: linear\nbase_model: {pair['plain']}\nmodels:\n"
            f"  - model: {pair['plain']}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {pair['added']}\n    parameters: {{weight: 0.5}}\n"
            "tokenizer_source: union\ndtype: float32\n")


def test_union_merge_loads_and_matches_a_direct_computation(tmp_path, union_pair):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    api.merge(Store(str(tmp_path / "store")), union_recipe(union_pair), out_dir=str(out), progress=False,
              max_memory="256M")
    plain = load_file(os.path.join(union_pair["plain"], "model.safetensors"))
    added = load_file(os.path.join(union_pair["added"], "model.safetensors"))
    plain_tok, added_tok = AutoTokenizer.from_pretrained(union_pair["plain"]), AutoTokenizer.from_pretrained(union_pair["added"])
    tok = AutoTokenizer.from_pretrained(str(out))
    n = len(plain_tok)
    new = ADDED_SPECIAL + ADDED_WORDS
    # the union: the plain vocabulary, then the added tokens (the base lacks them)
    assert len(tok) == n + len(new) and tok.convert_tokens_to_ids(new) == list(range(n, n + len(new)))
    assert [tok.convert_ids_to_tokens(i) for i in range(0, n, 997)] == [plain_tok.convert_ids_to_tokens(i) for i in range(0, n, 997)]

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = model.state_dict()
    expected = {}
    for name, value in plain.items():
        if name == "model.embed_tokens.weight":
            rows = added[name][added_tok.convert_tokens_to_ids(new)]       # only that model has them
            value = torch.cat([0.5 * value + 0.5 * added[name][:n], rows])
        else:
            value = 0.5 * value + 0.5 * added[name]
        expected[name] = value
        assert torch.allclose(ours[name], value, atol=1e-6, rtol=0), name
    assert model.config.vocab_size == n + len(new) and model.config.tie_word_embeddings
    assert torch.equal(ours["lm_head.weight"], ours["model.embed_tokens.weight"])

    direct = AutoModelForCausalLM.from_pretrained(union_pair["plain"], dtype=torch.float32).eval()
    direct.resize_token_embeddings(n + len(new), mean_resizing=False)
    direct.load_state_dict(expected, strict=False)
    ids = tok("<tool_call>tensorstore zarrification of a JSON file</tool_call>", return_tensors="pt")["input_ids"]
    assert set(range(n, n + len(new))) <= set(ids[0].tolist())
    with torch.no_grad():
        logits, reference = model(ids).logits, direct(ids).logits
    assert torch.allclose(logits, reference, atol=1e-4, rtol=0), float((logits - reference).abs().max())
    assert logits[0, :, n:].abs().max() > 0    # the added tokens have real logits
