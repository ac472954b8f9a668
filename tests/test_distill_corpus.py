"""Corpus reading, the packing rule, and clear errors for corpora that cannot be packed."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tensorstore_llm.distill import losses
from tensorstore_llm.errors import DatasetMismatch, FormatError
from tensorstore_llm.hf.corpus import read_corpus
from tensorstore_llm.hf.packing import EOS_TEXT, Packing, PackingRule, tokenizer_fingerprint

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "corpus")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    return AutoTokenizer.from_pretrained(smollm2_checkpoint())

# small tensors: one intra-op thread is several times faster than two on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_formats_read_the_same_documents(tmp_path, tok):
    docs = ["First document.\nIt has two lines.", "Second one, with ünïcode.", "Third."]
    (tmp_path / "a.txt").write_text("\n\n\n".join(docs), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    pq.write_table(pa.table({"body": docs}), str(tmp_path / "c.parquet"))
    assert read_corpus(str(tmp_path / "a.txt")).documents == docs
    assert read_corpus(str(tmp_path / "b.jsonl")).documents == docs
    assert read_corpus(str(tmp_path / "c.parquet"), text_field="body").documents == docs
    with pytest.raises(FormatError, match="no column 'text'"):
        read_corpus(str(tmp_path / "c.parquet"))
    assert read_corpus(str(tmp_path / "a.txt")).fingerprint != read_corpus(str(tmp_path / "b.jsonl")).fingerprint


def test_chat_corpus_rendered_with_template(tok):
    corpus = read_corpus(os.path.join(DATA, "chat.jsonl"), tokenizer=tok)
    assert corpus.chat and corpus.chat_template_sha and len(corpus.documents) == 6
    assert corpus.documents[0].startswith("<|im_start|>") and "sorted(words, key=str.lower)" in corpus.documents[0]


def test_clear_errors_for_unusable_corpora(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(DatasetMismatch, match="empty"):
        read_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"title": 3}\n', encoding="utf-8")
    with pytest.raises(FormatError, match=r"bad\.jsonl:2"):
        read_corpus(str(tmp_path / "bad.jsonl"))
    tok_plain = type(tok).from_pretrained(tok.name_or_path)
    tok_plain.chat_template = None
    with pytest.raises(DatasetMismatch, match="no chat template"):
        read_corpus(os.path.join(DATA, "chat.jsonl"), tokenizer=tok_plain)
    with pytest.raises(DatasetMismatch, match=r"needs? a tokenizer"):
        read_corpus(os.path.join(DATA, "chat.jsonl"))
    with pytest.raises(DatasetMismatch, match="fewer than one sequence of seq_len=512"):
        Packing(["Too short.", "Also short."], tok, PackingRule(seq_len=512))
    with pytest.raises(DatasetMismatch, match="does not exist"):
        read_corpus(str(tmp_path / "missing"))


def test_packing_rule(tok):
    docs = read_corpus(os.path.join(DATA, "docstrings.jsonl")).documents[:6]
    rule = PackingRule(seq_len=16, shuffle_seed=None)
    p = Packing(docs, tok, rule)
    stream = np.concatenate([tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in docs])
    assert np.array_equal(p.sequences.reshape(-1), stream[: len(p) * 16])        # concat + EOS, tail dropped
    assert len(p) == len(stream) // 16
    shuffled = Packing(docs, tok, PackingRule(seq_len=16, shuffle_seed=3))
    assert shuffled.fingerprint() != p.fingerprint()
    assert Packing(docs, tok, PackingRule(seq_len=16, shuffle_seed=3)).sequences.tolist() == shuffled.sequences.tolist()
    assert sorted(shuffled.stream.tolist()) == sorted(p.stream.tolist())           # same tokens, other order
    for i in range(len(p)):                                                          # offsets spell the tokens
        text, off = p.text_and_offsets(i)
        for t, (a, b) in zip(p.sequences[i], off):
            piece = tok.decode([int(t)])
            assert text[a:b] == (EOS_TEXT if t == tok.eos_token_id else piece)


def test_tokenizer_fingerprint_sees_template_not_padding(tok):
    base = tokenizer_fingerprint(tok)
    tok2 = type(tok).from_pretrained(tok.name_or_path)
    tok2(["a", "bb"], padding=True)                      # padding state changes nothing
    assert tokenizer_fingerprint(tok2) == base
    tok2.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(tok2) != base


def test_topk_losses_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 10, generator=g)
    t = torch.softmax(torch.randn(2, 3, 10, generator=g), -1)
    p, ids = torch.topk(t, 4, dim=-1)
    mask = torch.ones_like(ids, dtype=torch.bool)
    s = torch.softmax(z, -1)
    s_k = torch.gather(s, -1, ids)
    want_ignore = -((p / p.sum(-1, keepdim=True)) * s_k.log()).sum(-1).mean()
    want_bucket = (-(p * s_k.log()).sum(-1) - (1 - p.sum(-1)) * torch.log(1 - s_k.sum(-1))).mean()
    torch.testing.assert_close(losses.topk_kd_loss(z, ids, p, mask, mode="ignore-tail"), want_ignore)
    torch.testing.assert_close(losses.topk_kd_loss(z, ids, p, mask, mode="tail-bucket"), want_bucket)
    # dense KD with temperature: T^2 KL(softmax(t/T) || softmax(z/T))
    T = 2.0
    tl = torch.randn(2, 3, 10, generator=g)
    a, b = torch.softmax(tl / T, -1), torch.softmax(z / T, -1)
    torch.testing.assert_close(losses.dense_kd_loss(z, tl, temperature=T), T * T * (a * (a / b).log()).sum(-1).mean())
    # full-support sparse targets make the sparse KL equal the dense one
    full_ids = torch.arange(10).expand(2, 3, 10)
    torch.testing.assert_close(losses.sparse_kd_loss(z, full_ids, a, torch.ones_like(full_ids, dtype=torch.bool),
                                                     temperature=T), losses.dense_kd_loss(z, tl, temperature=T))
