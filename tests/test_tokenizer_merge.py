"""Merges over different vocabularies: ``tokenizer_source`` (base, union, a model) and the
``tokenizer:`` block (tokens with source / force, pad_to_multiple_of).

The models are small Llama checkpoints written here with known fp32 rows and real byte-level
BPE tokenizers trained on data/corpus (different merges, so shared tokens sit at different ids
in different models), plus tokenizers with added tokens. Every output row of the embedding and
LM head is checked against a direct formula over the inputs' rows, looked up by token string;
the same recipes run through mergekit, whose outputs must load in transformers and give the
same logits (fp32) with the same vocabulary.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tensorstore_llm import api
from tensorstore_llm.errors import RecipeError, TokenizerError
from tensorstore_llm.store import Store
from tensorstore_llm.testing.synth import LlamaShape, llama_config, tensor_metas

CORPUS = os.path.join(os.path.dirname(__file__), "..", "data", "corpus")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def _bpe(text: str, size: int, eos: str = "<|im_end|>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=size, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token=eos,
                                  pad_token="<|endoftext|>")


def _write_model(path, tokenizer, seed: int) -> str:
    """A 2-layer Llama (hidden 64) whose vocabulary is ``tokenizer``'s, fp32 rows N(0, 0.02)."""
    shape = LlamaShape(64, 96, 2, 4, 2, len(tokenizer))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for meta in tensor_metas(shape, "float32"):
        if meta.name.endswith("norm.weight"):
            tensors[meta.name] = 1 + 0.1 * torch.randn(meta.shape, generator=gen)
        else:
            tensors[meta.name] = 0.02 * torch.randn(meta.shape, generator=gen)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(llama_config(shape, "float32"), f)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory):
    """a: BPE on literature (400); b: BPE on docstrings (360) + added <tool>; c: a's tokenizer +
    added <tool>, <c_only>; d: like a but another eos token. Each a model of its vocabulary."""
    root = tmp_path_factory.mktemp("vocab-family")
    literature = open(os.path.join(CORPUS, "literature.txt"), encoding="utf-8").read()
    docstrings = open(os.path.join(CORPUS, "docstrings.jsonl"), encoding="utf-8").read()
    tok_a, tok_b, tok_c = _bpe(literature, 400), _bpe(docstrings, 360), _bpe(literature, 400)
    tok_b.add_tokens(["<tool>"], special_tokens=True)
    tok_c.add_tokens(["<tool>", "<c_only>"], special_tokens=True)
    tok_d = _bpe(literature, 400, eos="<|endoftext|>")
    return {name: _write_model(root / name, tok, seed) for seed, (name, tok) in
            enumerate([("a", tok_a), ("b", tok_b), ("c", tok_c), ("d", tok_d)])}


def _tensors(path):
    return load_file(os.path.join(path, "model.safetensors")) if os.path.exists(os.path.join(path, "model.safetensors")) \
        else {k: v for f in sorted(os.listdir(path)) if f.endswith(".safetensors") for k, v in load_file(os.path.join(path, f)).items()}


def _vocab(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


def _merge(tmp_path, text, **kw):
    out = tmp_path / "out"
    api.merge(Store(str(tmp_path / "store")), text, out_dir=str(out), progress=False, **kw)
    return str(out)


def test_union_linear_rows_follow_the_rules(tmp_path, vocab_family):
    """Linear over a and b (no base): a token both have is each model's own row, one only b
    has is b's row in both (the donor), so the merged row is the weighted mean of those."""
    a, b = vocab_family["a"], vocab_family["b"]
    text = f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n  - model: {b}\n    parameters: {{weight: 0.7}}\ntokenizer_source: union\n"
    out = _merge(tmp_path, text)
    vocab, va, vb = _vocab(out), _vocab(a), _vocab(b)
    assert set(vocab) == set(va) | set(vb)
    assert all(vocab[t] == i for t, i in va.items())               # the base (first) model's ids stay
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == len(vocab)
    merged, ta, tb = _tensors(out), _tensors(a), _tensors(b)
    for name in VOCAB_NAMES:
        assert merged[name].shape == (len(vocab), 64)
        for token, i in vocab.items():
            row_a = ta[name][va[token]] if token in va else tb[name][vb[token]]
            row_b = tb[name][vb[token]] if token in vb else ta[name][va[token]]
            torch.testing.assert_close(merged[name][i], 0.3 * row_a + 0.7 * row_b, rtol=0, atol=1e-7)
    torch.testing.assert_close(merged["model.layers.1.mlp.up_proj.weight"],
                               0.3 * ta["model.layers.1.mlp.up_proj.weight"] + 0.7 * tb["model.layers.1.mlp.up_proj.weight"],
                               rtol=0, atol=1e-7)
