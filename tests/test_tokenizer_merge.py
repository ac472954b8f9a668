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
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tensorstore_llm import api
from tensorstore_llm.errors import RecipeError, TokenizerError
from tensorstore_llm.store import Store
from tensorstore_llm.testing.synth import LlamaShape, llama_config, tensor_metas

from helpers import dir_tensors

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
    literature = Path(CORPUS, "literature.txt").read_text(encoding="utf-8")
    docstrings = Path(CORPUS, "docstrings.jsonl").read_text(encoding="utf-8")
    tok_a, tok_b, tok_c = _bpe(literature, 400), _bpe(docstrings, 360), _bpe(literature, 400)
    tok_b.add_tokens(["<tool>"], special_tokens=True)
    tok_c.add_tokens(["<tool>", "<c_only>"], special_tokens=True)
    tok_d = _bpe(literature, 400, eos="<|endoftext|>")
    return {name: _write_model(root / name, tok, seed) for seed, (name, tok) in
            enumerate([("a", tok_a), ("b", tok_b), ("c", tok_c), ("d", tok_d)])}


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
    assert json.loads(Path(out, "config.json").read_text())["vocab_size"] == len(vocab)
    merged, ta, tb = dir_tensors(out), dir_tensors(a), dir_tensors(b)
    for name in VOCAB_NAMES:
        assert merged[name].shape == (len(vocab), 64)
        for token, i in vocab.items():
            row_a = ta[name][va[token]] if token in va else tb[name][vb[token]]
            row_b = tb[name][vb[token]] if token in vb else ta[name][va[token]]
            torch.testing.assert_close(merged[name][i], 0.3 * row_a + 0.7 * row_b, rtol=0, atol=1e-7)
    torch.testing.assert_close(merged["model.layers.1.mlp.up_proj.weight"],
                               0.3 * ta["model.layers.1.mlp.up_proj.weight"] + 0.7 * tb["model.layers.1.mlp.up_proj.weight"],
                               rtol=0, atol=1e-7)


TOKENS_RECIPE = """merge_method: task_arithmetic
base_model: {a}
models:
  - model: {b}
    parameters: {{weight: 0.8}}
tokenizer:
  source: union
  pad_to_multiple_of: 64
  tokens:
    "<tool>": {{source: {{kind: model_token, model: {a}, token: "<|im_end|>"}}}}
    "<|im_start|>": {{source: {{kind: zero}}, force: true}}
    "<new>": {{source: {{kind: model_token, model: {b}, token_id: 5}}}}
"""


def _rows_by_rule(vocab, rows, own, fill):
    """A model's rows in the output vocabulary: its own row, else the fill; padding: the mean."""
    out = []
    for token, _i in sorted(vocab.items(), key=lambda kv: kv[1]):
        out.append(own(token) if own(token) is not None else fill(token))
    out = torch.stack(out)
    return torch.cat([out, out.mean(0, keepdim=True).expand(rows - len(vocab), -1)])


def test_tokens_block_force_sources_and_padding(tmp_path, vocab_family):
    """task_arithmetic a + 0.8 (b - a) over the union padded to 64: forced tokens take their source
    in every model, a token one model lacks takes the other's row (or the named model_token row),
    a token no model has its named row, padding rows each model's mean row."""
    a, b = vocab_family["a"], vocab_family["b"]
    out = _merge(tmp_path, TOKENS_RECIPE.format(a=a, b=b))
    vocab, va, vb = _vocab(out), _vocab(a), _vocab(b)
    assert set(vocab) == set(va) | set(vb) | {"<new>"}
    rows = -(-len(vocab) // 64) * 64
    assert rows > len(vocab) and json.loads(Path(out, "config.json").read_text())["vocab_size"] == rows
    merged, ta, tb = dir_tensors(out), dir_tensors(a), dir_tensors(b)
    zero = torch.zeros(64)
    for name in VOCAB_NAMES:

        def fill(token, name=name):
            if token == "<|im_start|>":
                return zero
            if token == "<tool>":
                return ta[name][va["<|im_end|>"]]
            if token == "<new>":
                return tb[name][5]
            return ta[name][va[token]] if token in va else tb[name][vb[token]]

        def own_a(token, name=name):
            return None if token == "<|im_start|>" or token not in va else ta[name][va[token]]

        def own_b(token, name=name):
            return None if token == "<|im_start|>" or token not in vb else tb[name][vb[token]]

        rows_a, rows_b = _rows_by_rule(vocab, rows, own_a, fill), _rows_by_rule(vocab, rows, own_b, fill)
        assert merged[name].shape == (rows, 64)
        torch.testing.assert_close(merged[name], rows_a + 0.8 * (rows_b - rows_a), rtol=0, atol=2e-7)
        assert torch.equal(merged[name][vocab["<|im_start|>"]], zero)


def test_blocking_does_not_change_the_result_and_tokenizer_travels_with_the_artifact(tmp_path, vocab_family):
    """A tight --max-memory (many small gathered blocks, the padding mean summed over many tiles)
    gives the same bytes; the store artifact carries the merged tokenizer and config to its export."""
    text = TOKENS_RECIPE.format(**vocab_family)
    wide = dir_tensors(_merge(tmp_path / "wide", text, max_memory="1G"))
    store = Store(str(tmp_path / "store"))
    art = api.merge(store, text, progress=False, max_memory="64K").artifact
    exported = tmp_path / "export"
    api.export(store, art.id, str(exported), progress=False)
    narrow = dir_tensors(str(exported))
    assert wide.keys() == narrow.keys() and all(torch.equal(wide[k], narrow[k]) for k in wide)
    assert _vocab(str(exported)) == _vocab(_merge(tmp_path / "again", text))


def _mergekit(text, out):
    pytest.importorskip("mergekit", reason="mergekit is not installed (pip install mergekit) — comparison skipped")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True))
    return str(out)


def _logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("recipe,same_ids", [
    (TOKENS_RECIPE, False),
    (("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.4}}\n  - model: {c}\n"
      "    parameters: {{weight: 0.6}}\nbase_model: {a}\ntokenizer_source: union\n"), True),
    (("merge_method: task_arithmetic\nbase_model: {a}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
      "tokenizer_source: {b}\n"), True),
    (("merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 2]}}]\n"
      "  - sources: [{{model: {b}, layer_range: [1, 2]}}]\ntokenizer_source: union\n"), False),   # a frankenmerge
])
def test_matches_mergekit(tmp_path, vocab_family, recipe, same_ids):
    """Same recipe through mergekit (fp32): the same vocabulary (the same ids, except that mergekit
    numbers several new ordinary tokens in hash order), the same rows and the same logits. In the
    frankenmerge the embedding's missing tokens are filled from the first slice's model only
    (zeros where it lacks them), the LM head's from the last slice's, as mergekit does."""
    text = recipe.format(**vocab_family) + "dtype: float32\n"
    ours, theirs = _merge(tmp_path, text), _mergekit(text, tmp_path / "mk")
    vo, vt = _vocab(ours), _vocab(theirs)
    assert set(vo) == set(vt)
    if same_ids:
        assert vo == vt
    if "base_model" in text:   # without one, mergekit starts the union from either model (a set's order)
        fixed = set(_vocab(vocab_family["a"])) if "union" in text else set(vo)
        assert all(vo[t] == vt[t] for t in fixed | ({"<tool>", "<new>"} & set(vo)))
    order = sorted(vo, key=vo.get)
    to_theirs = torch.tensor([vt[t] for t in order])
    mine, other = dir_tensors(ours), dir_tensors(theirs)
    assert mine.keys() == other.keys()
    for name, value in mine.items():
        if name in VOCAB_NAMES:
            assert value.shape == other[name].shape
            torch.testing.assert_close(value[:len(vo)], other[name][to_theirs], rtol=0, atol=1e-6)
            torch.testing.assert_close(value[len(vo):], other[name][len(vo):], rtol=0, atol=1e-6)   # padding
        else:
            torch.testing.assert_close(value, other[name], rtol=0, atol=1e-6)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(ours)("It was the best of times, <tool> it was the worst")["input_ids"]
    theirs_ids = [vt[order[i]] for i in ids]
    torch.testing.assert_close(_logits(ours, ids)[:, :len(vo)], _logits(theirs, theirs_ids)[:, to_theirs], rtol=0, atol=1e-5)


@pytest.mark.parametrize("recipe,match", [
    ("merge_method: linear\nmodels: [{a}, {d}]\ntokenizer_source: union\n", "eos_token is '<|im_end|>' in .* but '<|endoftext|>'"),
    ("merge_method: linear\nmodels: [{a}, {b}]\ntokenizer: {{tokens: {{x: {{source: {c}}}}}}}\n", "model .* is not in the recipe"),
    ("merge_method: linear\nmodels: [{a}, {b}]\ntokenizer: {{source: union, tokens: {{'<tool>': {{source: {a}, force: true}}}}}}\n",
     "token '<tool>': its source model .* does not have this token"),
    ("merge_method: linear\nmodels: [{a}, {ft1}]\ntokenizer_source: union\n", "model .*ft1 has no tokenizer files"),
    ("merge_method: linear\nmodels: [{a}, {ft1}]\ntokenizer_source: {ft1}\n", "tokenizer source .*ft1: model .*ft1 has no tokenizer files"),
])
def test_bad_tokenizer_settings_fail_before_any_work(tmp_path, vocab_family, tiny_family, cli, recipe, match):
    text = recipe.format(**vocab_family, ft1=tiny_family["ft1"])
    store = Store(str(tmp_path / "s"))
    with pytest.raises(TokenizerError, match=match):
        api.merge(store, text, out_dir=str(tmp_path / "hf"), progress=False)
    assert store.list() == [] and not (tmp_path / "hf").exists()
    path = tmp_path / "r.yaml"
    path.write_text(text)
    code, _, err = cli("--store", tmp_path / "s2", "-q", "merge", path, "-o", tmp_path / "hf2")
    assert code == RecipeError.exit_code and "token" in err.lower()
    assert not (tmp_path / "hf2").exists()


def test_base_without_tokenizer_files_keeps_the_old_meaning(tmp_path, tiny_family):
    """tokenizer_source: base over models that carry no tokenizer and share one vocabulary size:
    nothing to map, the same tensors as without the setting."""
    text = f"merge_method: linear\nmodels: [{tiny_family['ft1']}, {tiny_family['ft2']}]\nparameters: {{weight: 1}}\n"
    plain = api.merge(Store(str(tmp_path / "a")), text, progress=False).artifact
    based = api.merge(Store(str(tmp_path / "b")), text + "tokenizer_source: base\n", progress=False).artifact
    assert based.manifest.tensors == plain.manifest.tensors


def test_tied_embeddings(tmp_path, vocab_family):
    """Models that tie their LM head to the embedding (no lm_head tensor): the embedding is laid
    out in the union vocabulary, the output stays tied and loads in transformers."""
    tied = {}
    for key in ("a", "b"):
        path = tmp_path / f"tied-{key}"
        path.mkdir()
        tensors = {k: v for k, v in dir_tensors(vocab_family[key]).items() if k != "lm_head.weight"}
        save_file(tensors, str(path / "model.safetensors"))
        for f in os.listdir(vocab_family[key]):
            if not f.endswith(".safetensors"):
                (path / f).write_bytes(Path(vocab_family[key], f).read_bytes())
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
        tied[key] = str(path)
    text = (f"merge_method: linear\nmodels:\n  - model: {tied['a']}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {tied['b']}\n    parameters: {{weight: 0.5}}\ntokenizer_source: union\n")
    out = _merge(tmp_path, text)
    merged, vocab, va, vb = dir_tensors(out), _vocab(out), _vocab(tied["a"]), _vocab(tied["b"])
    assert "lm_head.weight" not in merged
    ta, tb = dir_tensors(tied["a"]), dir_tensors(tied["b"])
    name = "model.embed_tokens.weight"
    for token, i in vocab.items():
        row_a = ta[name][va[token]] if token in va else tb[name][vb[token]]
        row_b = tb[name][vb[token]] if token in vb else ta[name][va[token]]
        torch.testing.assert_close(merged[name][i], 0.5 * row_a + 0.5 * row_b, rtol=0, atol=1e-7)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, merged[name])


@pytest.mark.parametrize("copy_bytes", [8 << 20, 12])
def test_gather_rows_equals_indexing(tmp_path, monkeypatch, copy_bytes):
    """gather_rows equals plain indexing for any order, repeats and block size, also when rows
    move from each read into the output in small steps (64 rows at 12 bytes)."""
    import numpy as np

    from tensorstore_llm.io import gather
    from tensorstore_llm.io.hf_dir import HFCheckpointSource
    from tensorstore_llm.merge.vocab import gather_rows

    monkeypatch.setattr(gather, "COPY_BYTES", copy_bytes)

    table = torch.randn(1000, 3)
    save_file({"t": table}, str(tmp_path / "t.safetensors"))
    rng = np.random.default_rng(0)
    with HFCheckpointSource(str(tmp_path / "t.safetensors")) as source:
        for count in (1, 7, 64, 300, 1000, 2500):
            index = rng.integers(0, 1000, count)
            assert torch.equal(gather_rows(source, "t", index), table[torch.from_numpy(index)])
        assert torch.equal(gather_rows(source, "t", np.arange(100, 400)), table[100:400])


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_mergekit_bf16_arithmetic_is_replayed_bit_for_bit(tmp_path, vocab_family, method):
    """bf16 models, ``dtype: bfloat16`` and ``arithmetic="mergekit"`` over a union: every tensor,
    the gathered and filled vocabulary rows included, equals mergekit's bit for bit."""
    paths = {}
    for key in ("a", "b"):
        path = tmp_path / key
        path.mkdir()
        save_file({k: v.to(torch.bfloat16) for k, v in dir_tensors(vocab_family[key]).items()}, str(path / "model.safetensors"))
        for f in os.listdir(vocab_family[key]):
            if not f.endswith(".safetensors"):
                (path / f).write_bytes(Path(vocab_family[key], f).read_bytes())
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
        paths[key] = str(path)
    models = (f"  - model: {paths['a']}\n    parameters: {{weight: 0.3}}\n" if method == "linear" else "")
    text = (f"merge_method: {method}\nbase_model: {paths['a']}\nmodels:\n{models}  - model: {paths['b']}\n"
            f"    parameters: {{weight: 0.7}}\ntokenizer_source: union\ndtype: bfloat16\n")
    ours, theirs = _merge(tmp_path, text, arithmetic="mergekit"), _mergekit(text, tmp_path / "mk")
    vo, vt = _vocab(ours), _vocab(theirs)
    assert set(vo) == set(vt)
    to_theirs = torch.tensor([vt[t] for t in sorted(vo, key=vo.get)])
    mine, other = dir_tensors(ours), dir_tensors(theirs)
    assert mine.keys() == other.keys()
    for name, value in mine.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, other[name][to_theirs] if name in VOCAB_NAMES else other[name]), name


def test_base_tokenizer_past_its_vocab_size_is_refused(tmp_path, vocab_family):
    """A base whose tokenizer has ids past its config vocab_size: mergekit rewrites the tokenizer
    without them; tsllm refuses, naming the model and a token, before any work."""
    import shutil

    short_a = tmp_path / "short-a"
    shutil.copytree(vocab_family["a"], short_a)
    config = json.loads((short_a / "config.json").read_text())
    (short_a / "config.json").write_text(json.dumps({**config, "vocab_size": 390}))
    text = f"merge_method: linear\nmodels: [{short_a}, {vocab_family['b']}]\ntokenizer_source: union\n"
    store = Store(str(tmp_path / "s"))
    with pytest.raises(TokenizerError, match="10 token.* at or past its vocab_size 390"):
        api.merge(store, text, out_dir=str(tmp_path / "hf"), progress=False)
    assert store.list() == [] and not (tmp_path / "hf").exists()
