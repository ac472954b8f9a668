"""Cross-tokenizer alignment (VocAgnoLM): hand-made offset cases, a real tokenizer pair, selection."""
import math
import os

import numpy as np
import pytest
import torch

from tensorstore_llm.distill.align import aggregate_span, align_spans, select_tokens, teacher_guided_loss

# small tensors: one intra-op thread is several times faster than two on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spans(student, teacher):
    first, last = align_spans(np.array(student).reshape(-1, 2), np.array(teacher).reshape(-1, 2))
    return [(int(lo), int(hi)) if lo <= hi else None for lo, hi in zip(first, last)]


def brute_force(student, teacher):
    """Direct definition: the teacher tokens whose [start, end) overlaps the student's [a, b)."""
    out = []
    for a, b in student:
        hit = [j for j, (c, d) in enumerate(teacher) if b > a and d > a and c < b]
        out.append((hit[0], hit[-1]) if hit else None)
    return out


def test_one_to_many_and_many_to_one():
    # text "hello": student "hello" over teacher "he" + "llo"; and the reverse
    assert spans([[0, 5]], [[0, 2], [2, 5]]) == [(0, 1)]
    assert spans([[0, 2], [2, 5]], [[0, 5]]) == [(0, 0), (0, 0)]


def test_unmapped_tokens():
    # a zero-width student token (BOS) and student text the teacher never covered
    assert spans([[0, 0], [0, 5], [6, 9]], [[0, 2], [2, 5]]) == [None, (0, 1), None]


def test_unicode_bytes_split_across_teacher_tokens():
    text = "naïve 你好"
    assert text.index("你") == 6
    # byte-level teacher: "你" split in two byte tokens with the same character span, "好" one token
    teacher = [[0, 5], [5, 6], [6, 7], [6, 7], [7, 8]]
    student = [[0, 2], [2, 5], [5, 6], [6, 8]]          # "na", "ïve", " ", "你好"
    assert spans(student, teacher) == [(0, 0), (0, 0), (1, 1), (2, 4)]
    assert spans(student, teacher) == brute_force(student, teacher)


def test_whitespace_merged_differently():
    # "hello world": teacher keeps the space with the next word, student with the previous one
    teacher = [[0, 5], [5, 11]]                          # "hello", " world"
    student = [[0, 6], [6, 11]]                          # "hello ", "world"
    assert spans(student, teacher) == [(0, 1), (1, 1)]
    student = [[0, 5], [5, 6], [6, 11]]                  # "hello", " ", "world"
    assert spans(student, teacher) == [(0, 0), (1, 1), (1, 1)]


def test_aggregation_max_sum_mean_and_missing_values():
    nll = np.array([np.nan, 1.0, 3.0, 2.0])              # the teacher's first token has no NLL
    first = np.array([0, 1, 0, 3, 2])
    last = np.array([0, 2, 3, 2, 2])                     # spans: [0], [1, 2], [0..3], unmapped, [2]
    np.testing.assert_array_equal(aggregate_span(nll, first, last, "max"), [np.nan, 3.0, 3.0, np.nan, 3.0])
    np.testing.assert_array_equal(aggregate_span(nll, first, last, "sum"), [np.nan, 4.0, 6.0, np.nan, 3.0])
    np.testing.assert_array_equal(aggregate_span(nll, first, last, "mean"), [np.nan, 2.0, 2.0, np.nan, 3.0])
    with pytest.raises(ValueError):
        aggregate_span(nll, first, last, "median")


def test_real_tokenizer_pair_matches_brute_force():
    """SmolLM2's tokenizer against a 300-token BPE trained here with `tokenizers` on the shipped corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    corpus = os.path.join(os.path.dirname(__file__), "..", "data", "corpus", "literature.txt")
    text = open(corpus, encoding="utf-8").read()
    student = Tokenizer(models.BPE(unk_token="[UNK]"))
    student.pre_tokenizer = pre_tokenizers.Whitespace()
    student.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    teacher = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    sample = text[:1500] + " naïve 你好 — ok"
    s_off = np.array(student.encode(sample).offsets)
    t_off = np.array(teacher(sample, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"])
    assert len(s_off) != len(t_off)                      # really different tokenisations
    got = spans(s_off.tolist(), t_off.tolist())
    assert got == brute_force(s_off.tolist(), t_off.tolist())
    assert sum(g is None for g in got) == 0              # both tokenizers cover every character here


def test_select_top_fraction_plus_unmapped():
    student = torch.tensor([5.0, 1.0, 4.0, 3.0, 2.0, 9.0, 0.5])
    teacher = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, float("nan"), 0.0])
    chosen = select_tokens(student, teacher, fraction=0.4)
    # 6 mapped tokens -> ceil(2.4) = 3 best scores (4, 3, 2 -> indices 0, 2, 3) + the unmapped index 5
    assert chosen.tolist() == [True, False, True, True, False, True, False]
    assert select_tokens(student, teacher, fraction=1.0).all()


def test_teacher_guided_loss_averages_selected_tokens():
    logits = torch.randn(1, 6, 11, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = torch.tensor([[1, 2, 3, 4, 5, 6]])
    teacher = torch.tensor([[float("nan"), 0.5, float("nan"), 9.0, 0.1, 0.2]])
    loss = teacher_guided_loss(logits, labels, teacher, fraction=0.5)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="none")
    score = (nll - teacher[0, 1:]).detach()
    mapped = [0, 2, 3, 4]
    best = sorted(mapped, key=lambda i: -float(score[i]))[:math.ceil(0.5 * 4)]
    chosen = sorted(best + [1])
    assert torch.allclose(loss, nll[chosen].mean())
    loss.backward()
    assert logits.grad[0, 5].abs().sum() == 0            # the last position predicts nothing
