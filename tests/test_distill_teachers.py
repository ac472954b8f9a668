"""Several teachers in one dataset, and a teacher stored in the store (`--teacher ARTIFACT`)."""
import os
import tempfile

import numpy as np
import pytest
import torch

from tensorstore_llm.distill import sampling
from tensorstore_llm.distill.dataset import DistillDataset
from tensorstore_llm.distill.encoding import decode_table
from tensorstore_llm.distill.precompute import (
    SamplingConfig,
    precompute,
    teacher_targets,
)
from tensorstore_llm.distill.shards import open_dataset
from tensorstore_llm.distill.stats import dataset_stats
from tensorstore_llm.errors import DatasetMismatch
from tensorstore_llm.hf.models import CausalLM
from tensorstore_llm.hf.packing import PackingRule
from tensorstore_llm.seeding import seed_value

CORPUS = os.path.join(os.path.dirname(__file__), "..", "data", "corpus", "docstrings.jsonl")
SLICE = dict(rule=PackingRule(seq_len=32, shuffle_seed=0), max_sequences=3, shard_sequences=2, batch_size=2,
             position_chunk=16)
V, N = 49152, 50


@pytest.fixture(scope="module")
def teacher():
    from tensorstore_llm.hf.models import load_causal_lm
    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_causal_lm(smollm2_checkpoint())
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def second(teacher):
    """Another teacher with SmolLM2's tokenizer: a small random Llama (hidden 64, 1 layer)."""
    from tensorstore_llm.distill.learning import tiny_student

    model = tiny_student(V, hidden=64, layers=1, seed=3, tokenizer=teacher.tokenizer).eval()
    return CausalLM(model, teacher.tokenizer, "tiny-random", "tiny-random-fingerprint")


def decoded(path, teacher=0):
    ds = open_dataset(path)
    return [s for n in ds.shard_names() for s in decode_table(ds.read_shard(n), V, N, teacher=teacher)]


def test_two_teachers_in_one_dataset(teacher, second, tmp_path):
    cfg = SamplingConfig(draws=N, alignment=True)
    single = precompute(teacher, CORPUS, str(tmp_path / "one"), config=cfg, **SLICE)
    both = precompute([teacher, second], CORPUS, str(tmp_path / "two"), config=cfg, **SLICE)
    info = open_dataset(both).info
    assert [t["source"] for t in info["teachers"]] == [teacher.source, "tiny-random"]
    assert info["packing_fingerprint"] == open_dataset(single).info["packing_fingerprint"]
    assert info["fingerprint"] != open_dataset(single).info["fingerprint"]
    # teacher 0's columns are the single-teacher dataset's; teacher 1's are its own draws
    for a, b in zip(decoded(single), decoded(both, 0)):
        assert a.sequence == b.sequence and np.array_equal(a.input_ids, b.input_ids) and a.text == b.text
        assert np.array_equal(a.rows.ids, b.rows.ids) and np.array_equal(a.rows.counts, b.rows.counts)
        assert np.array_equal(a.nll, b.nll, equal_nan=True)
    others = decoded(both, 1)
    for k in range(0, 3, 2):
        idx = list(range(k, min(3, k + 2)))
        ids = torch.from_numpy(np.stack([others[i].input_ids for i in idx]).astype(np.int64))
        rows, nll = teacher_targets(second, ids, idx, cfg, position_chunk=16, teacher=1)
        for i, r, n in zip(idx, rows, nll):
            assert np.array_equal(others[i].rows.ids, r.ids) and np.array_equal(others[i].rows.counts, r.counts)
            assert np.array_equal(others[i].nll, n, equal_nan=True)
            assert np.all(np.add.reduceat(r.counts.astype(int), r.offsets[:-1]) == N)
    stats = dataset_stats(both)
    assert stats["teachers"] == 2 and stats["tokens"] == 3 * 32
    assert stats["pairs"] == sum(len(s.rows.ids) for s in decoded(single)) + sum(len(s.rows.ids) for s in others)
    # read time: weighted average over the union of ids, or a seeded choice per sequence
    mixed = list(DistillDataset(both, shuffle=False, tokenizer=teacher.tokenizer, teacher_weights=[3, 1]))
    for item, a, b in zip(mixed, decoded(both, 0), others):
        want = 0.75 * sampling.dense_targets(a.rows, V, N) + 0.25 * sampling.dense_targets(b.rows, V, N)
        got = torch.zeros(32, V, dtype=torch.float64)
        got.scatter_add_(1, item["target_ids"], item["target_weights"].double() * item["target_mask"])
        torch.testing.assert_close(got, want)
    only_second = list(DistillDataset(both, shuffle=False, teacher_weights=[0, 1]))
    for item, b in zip(only_second, others):
        assert int(item["target_mask"].sum()) == len(b.rows.ids)
    choice = DistillDataset(both, shuffle=False, teacher_weights=[1, 1], teacher_mode="choice", seed=5)
    for s, a, b in zip(choice.sequences(), decoded(both, 0), others):   # the documented per-sequence draw
        rng = np.random.Generator(np.random.SFC64(seed_value(5, "distill-teacher", "epoch/0", s.sequence)))
        picked = [a, b][int(rng.choice(2, p=[0.5, 0.5]))]
        torch.testing.assert_close(sampling.dense_targets(s.rows, V), sampling.dense_targets(picked.rows, V, N))
    with pytest.raises(DatasetMismatch, match="one non-negative weight per teacher"):
        DistillDataset(both, teacher_weights=[1])


def test_teachers_with_other_tokenizers_are_refused(teacher, second, tmp_path):
    import copy

    from tensorstore_llm.distill.learning import tiny_student

    tok = copy.deepcopy(teacher.tokenizer)
    tok.add_tokens(["<other-token>"])
    other = CausalLM(tiny_student(len(tok), hidden=32, layers=1).eval(), tok, "other-tokenizer", "x")
    with pytest.raises(DatasetMismatch, match="different tokenizers"):
        precompute([teacher, other], CORPUS, str(tmp_path / "o"), **SLICE)
    assert not os.path.exists(str(tmp_path / "o.partial"))


def test_teacher_from_the_store(cli, teacher, tmp_path, monkeypatch):
    """`--teacher TAG`: the checkpoint artifact is the teacher, recorded by its id, its targets
    byte-identical to the same checkpoint read from its directory."""
    from tensorstore_llm.store import Store

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))          # the teacher's export goes here
    store = str(tmp_path / "store")
    code, _, err = cli("--store", store, "-q", "import", teacher.source, "--name", "smol")
    assert code == 0, err
    args = ["--data", CORPUS, "--seq-len", "32", "--max-sequences", "3", "--shard-sequences", "2", "--batch-size", "2",
            "--draws", "50"]
    code, _, err = cli("--store", store, "logits", "precompute", "--teacher", "smol", "--name", "kd", *args)
    assert code == 0, err
    s = Store(store)
    teacher_id = s.resolve("smol")
    artifact = s.get("kd")
    assert artifact.manifest.parents == [{"id": teacher_id, "role": "teacher"}]
    code, out, err = cli("--store", store, "log", "kd")
    assert code == 0 and "teacher" in out and s.get(teacher_id).short_id in out, err
    info = open_dataset("kd", s).info
    assert info["teacher"] == teacher_id and info["teacher_source"] == f"artifact {teacher_id}"
    code, _, err = cli("--store", store, "logits", "precompute", "--teacher", teacher.source, "--out",
                       str(tmp_path / "from-dir"), *args)
    assert code == 0, err
    from_dir, from_store = open_dataset(str(tmp_path / "from-dir")), open_dataset("kd", s)
    assert from_dir.shard_names() == from_store.shard_names()
    for name in from_dir.shard_names():
        assert from_dir.read_bytes(name) == from_store.read_bytes(name)
    code, out, _ = cli("--store", store, "logits", "show", "kd")
    assert f"artifact {teacher_id}" in out
    code, _, err = cli("--store", store, "logits", "precompute", "--teacher", "kd", *args)
    assert code != 0 and "not a checkpoint" in err
