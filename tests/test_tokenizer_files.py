"""Tokenizers loaded with the ``tokenizers`` library alone (merge/tokenizer_files.py) give the same
merge vocabulary as transformers' AutoTokenizer, on SmolLM2's real tokenizer.

The pair: A is SmolLM2-135M's tokenizer as cached (49,152 tokens); B has the same tokens with every
ordinary token's id shuffled, plus ordinary and special added tokens. Each vocabulary setting is
built twice (``backend="tokenizers"`` and ``backend="transformers"``): the row maps, fill rules
and vocabulary must be equal, and the two output tokenizers, loaded by transformers, must have the
same vocabulary, added tokens, special tokens, encodings and chat template rendering.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tensorstore_llm.errors import TokenizerError
from tensorstore_llm.merge.tokenizer import (
    TokenizerSpec,
    TokenRule,
    TokenSource,
    build_vocabulary,
)
from tensorstore_llm.merge.tokenizer_files import (
    MODEL_SPECIFIC_TYPES,
    backend_refusal,
    load_tokenizer,
)

SAMPLES = ["<|im_start|>user\nHello <extra_3> world, <tool_call>x</tool_call><|im_end|>", "plain text: naïve café 12345",
           "<extra_0><extra_7>  spaced   out\n\n"]


def _files(path) -> dict:
    return {n: os.path.join(path, n) for n in sorted(os.listdir(path)) if not n.endswith(".safetensors")}


@pytest.fixture(scope="module")
def smol_pair(tmp_path_factory):
    from tokenizers import AddedToken, Tokenizer

    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    smol = smollm2_checkpoint()
    root = tmp_path_factory.mktemp("smol-pair")
    a, b = root / "a", root / "b"
    a.mkdir(), b.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        if os.path.exists(os.path.join(smol, name)):
            shutil.copy(os.path.join(smol, name), a / name)
    spec = json.loads((a / "tokenizer.json").read_text(encoding="utf-8"))
    special = {t["id"] for t in spec["added_tokens"]}
    vocab = spec["model"]["vocab"]
    ordinary = sorted((i, t) for t, i in vocab.items() if i not in special)
    shuffled = np.random.default_rng(0).permutation([i for i, _ in ordinary])
    for (_, token), new in zip(ordinary, shuffled.tolist()):
        vocab[token] = new
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_tokens([f"<extra_{k}>" for k in range(8)])
    tok.add_special_tokens([AddedToken("<tool_call>", special=True, normalized=False),
                            AddedToken("</tool_call>", special=True, normalized=False)])
    (b / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(a / name, b / name)
    return {"a": str(a), "b": str(b)}


SPECS = {
    "union": TokenizerSpec("union"),
    "union+tokens": TokenizerSpec("union", {"<tool_call>": TokenRule(TokenSource("zero"), force=True),
                                            "<new>": TokenRule(TokenSource("model_token", "b", "<extra_2>")),
                                            "<|im_end|>": TokenRule(None, force=True)}, pad_to_multiple_of=64),
    "source b": TokenizerSpec("b"),
}


def _loaded(files: dict, target):
    from transformers import AutoTokenizer

    target.mkdir()
    for name, data in files.items():
        (target / name).write_bytes(data)
    return AutoTokenizer.from_pretrained(str(target))


def _same_tokenizer(x, y):
    assert x.get_vocab() == y.get_vocab()
    assert {i: repr(t) for i, t in x.added_tokens_decoder.items()} == {i: repr(t) for i, t in y.added_tokens_decoder.items()}
    assert x.special_tokens_map == y.special_tokens_map and x.all_special_tokens == y.all_special_tokens
    for text in SAMPLES:
        assert x(text)["input_ids"] == y(text)["input_ids"]
        assert x.decode(x(text)["input_ids"]) == y.decode(y(text)["input_ids"])
    messages = [{"role": "user", "content": "Hi <extra_1>"}, {"role": "assistant", "content": "Hello"}]
    assert x.apply_chat_template(messages, tokenize=False) == y.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("setting", list(SPECS))
def test_union_is_the_same_built_with_tokenizers_or_transformers(tmp_path, smol_pair, setting):
    files = {ref: _files(path) for ref, path in smol_pair.items()}
    assert backend_refusal(files["a"]) is None and backend_refusal(files["b"]) is None
    fast, slow = (build_vocabulary(SPECS[setting], "a", ["a", "b"], files, "r.yaml", backend)
                  for backend in ("tokenizers", "transformers"))
    assert (fast.tokens, fast.rows, fast.pad_to_multiple_of) == (slow.tokens, slow.rows, slow.pad_to_multiple_of)
    assert fast.own.keys() == slow.own.keys() and all(np.array_equal(fast.own[r], slow.own[r]) for r in fast.own)
    assert fast.fills_for(["a", "b"]) == slow.fills_for(["a", "b"])
    assert fast.fills_for(["b"]) == slow.fills_for(["b"])
    if setting != "source b":
        assert fast.tokens > 49152 and fast.fills_for(["a", "b"])   # the union really grew and fills rows
    _same_tokenizer(_loaded(fast.files, tmp_path / "fast"), _loaded(slow.files, tmp_path / "slow"))


def test_a_config_with_added_tokens_decoder_is_extended(tmp_path, smol_pair):
    """A transformers-4 style config (``added_tokens_decoder`` listing tokenizer.json's added
    tokens) takes the fast path too; the union's config lists the new added tokens as well."""
    spec = json.loads(Path(smol_pair["a"], "tokenizer.json").read_text(encoding="utf-8"))
    decoder = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in spec["added_tokens"]}
    files = {"a": _variant(tmp_path, smol_pair, "v4", lambda c: c.update(added_tokens_decoder=decoder)),
             "b": _files(smol_pair["b"])}
    assert backend_refusal(files["a"]) is None
    fast, slow = (build_vocabulary(SPECS["union"], "a", ["a", "b"], files, "r.yaml", backend)
                  for backend in ("tokenizers", "transformers"))
    assert all(np.array_equal(fast.own[r], slow.own[r]) for r in fast.own)
    listed = json.loads(fast.files["tokenizer_config.json"])["added_tokens_decoder"]
    assert {e["content"] for e in listed.values()} >= {"<tool_call>", "<extra_7>"}
    _same_tokenizer(_loaded(fast.files, tmp_path / "fast"), _loaded(slow.files, tmp_path / "slow"))


def _variant(tmp_path, smol_pair, name, edit_config=None, extra=None):
    path = tmp_path / name
    shutil.copytree(smol_pair["a"], path)
    if edit_config:
        config = json.loads((path / "tokenizer_config.json").read_text())
        edit_config(config)
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    for file, data in (extra or {}).items():
        (path / file).write_text(data)
    return _files(path)


@pytest.mark.parametrize("name,edit,extra,reason", [
    ("gpt2-class", lambda c: c.update(tokenizer_class="GPT2Tokenizer"), None, "tokenizer class 'GPT2Tokenizer'"),
    ("missing-special", lambda c: c.update(pad_token="<pad>"), None, "special token '<pad>' is not a special added token"),
    ("legacy-map", None, {"special_tokens_map.json": '{"pad_token": "<|endoftext|>"}'}, "legacy special_tokens_map.json"),
    ("remote", lambda c: c.update(auto_map={"AutoTokenizer": ["x.Y", None]}), None, "remote code"),
    ("qwen2", None, {"config.json": '{"model_type": "qwen2", "vocab_size": 49152}'}, "model type 'qwen2'"),
])
def test_files_transformers_would_read_differently_fall_back(tmp_path, smol_pair, name, edit, extra, reason):
    """Where transformers would do more than read tokenizer.json (another class, a special token it
    adds, a legacy file that overrides the config, remote code), the fast path is refused with the
    reason, and ``auto`` loads the same tokenizer as transformers does."""
    files = _variant(tmp_path, smol_pair, name, edit, extra)
    assert reason in backend_refusal(files)
    with pytest.raises(TokenizerError, match="needs transformers to load"):
        load_tokenizer(files, name, "r.yaml", "tokenizers")
    if name != "remote":   # transformers refuses remote code itself
        auto, slow = load_tokenizer(files, name, "r.yaml"), load_tokenizer(files, name, "r.yaml", "transformers")
        assert type(auto) is type(slow) and auto.get_vocab() == slow.get_vocab()


def test_model_specific_types_cover_transformers():
    """MODEL_SPECIFIC_TYPES holds every model type that transformers loads with a model-specific
    tokenizer class although its config declares the generic one."""
    from transformers.models.auto.tokenization_auto import (
        MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS,
        TOKENIZER_MAPPING_NAMES,
    )

    forced = {t for t in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
              if TOKENIZER_MAPPING_NAMES.get(t) not in (None, "TokenizersBackend", "PreTrainedTokenizerFast")}
    assert forced <= MODEL_SPECIFIC_TYPES


def test_building_a_union_does_not_import_transformers(smol_pair):
    """The reason for the fast path: a merge over generic tokenizers never imports transformers."""
    code = ("import sys, os\nfrom tensorstore_llm.merge.tokenizer import TokenizerSpec, build_vocabulary\n"
            "files = {r: {n: os.path.join(p, n) for n in os.listdir(p)} for r, p in zip('ab', sys.argv[1:])}\n"
            "v = build_vocabulary(TokenizerSpec('union'), 'a', ['a', 'b'], files, 'r.yaml')\n"
            "print(v.tokens, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, smol_pair["a"], smol_pair["b"]], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["49162", "False"]
