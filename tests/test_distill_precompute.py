"""Precompute on the real SmolLM2-135M teacher over a slice of the shipped corpus, reload, resume, refuse."""
import os
import shutil

import numpy as np
import pytest
import torch

from tensorstore_llm.distill.dataset import DistillDataset, collate_sparse
from tensorstore_llm.distill.encoding import decode_table
from tensorstore_llm.distill.losses import distill_loss
from tensorstore_llm.distill.precompute import SamplingConfig, precompute
from tensorstore_llm.distill.shards import open_dataset
from tensorstore_llm.errors import DatasetMismatch, IntegrityError
from tensorstore_llm.hf.corpus import read_corpus
from tensorstore_llm.hf.packing import Packing, PackingRule

CORPUS = os.path.join(os.path.dirname(__file__), "..", "data", "corpus", "docstrings.jsonl")
RULE = PackingRule(seq_len=32, shuffle_seed=0)
SLICE = dict(rule=RULE, max_sequences=3, shard_sequences=2, batch_size=2)


@pytest.fixture(scope="module")
def teacher():
    """SmolLM2 in fp32; one intra-op thread: 32-token forwards are ~10x faster than with two threads
    on a shared 2-core machine (OpenMP barriers wait on descheduled workers)."""
    from tensorstore_llm.hf.models import load_causal_lm
    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_causal_lm(smollm2_checkpoint())
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(teacher, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("kd") / "rs-kd")
    precompute(teacher, CORPUS, out, config=SamplingConfig(draws=50, alignment=True), position_chunk=32, **SLICE)
    return out


def shard_hashes(path):
    ds = open_dataset(path)
    return {n: ds.files[n]["sha256"] for n in ds.shard_names()}


def test_precompute_and_reload(teacher, dataset):
    ds = open_dataset(dataset)
    info = ds.info
    assert info["vocab"] == 49152 and info["num_sequences"] == 3
    assert ds.shard_names() == ["shard-00000.parquet", "shard-00001.parquet"]
    packing = Packing(read_corpus(CORPUS).documents, teacher.tokenizer, RULE, read_corpus(CORPUS).fingerprint)
    assert info["packing_fingerprint"] == packing.fingerprint()
    seqs = [s for n in ds.shard_names() for s in decode_table(ds.read_shard(n), 49152, 50)]
    pairs = 0
    for s in seqs:
        assert np.array_equal(s.input_ids, packing.sequences[s.sequence])
        sums = np.add.reduceat(s.rows.counts.astype(int), s.rows.offsets[:-1])
        assert len(sums) == 32 and np.all(sums == 50)
        assert s.rows.ids.max() < 49152 and s.rows.ids.min() >= 0
        assert 0.2 < s.coverage <= 1.0
        text, offsets = packing.text_and_offsets(s.sequence)
        assert s.text == text and np.array_equal(s.char_offsets, offsets)
        assert np.isnan(s.nll[0]) and np.all(s.nll[1:] >= 0)
        pairs += len(s.rows.ids)
    tokens = 3 * 32
    print(f"\nSmolLM2 RS-KD N=50: {pairs / tokens:.1f} unique ids/position, "
          f"{ds.shard_bytes() / tokens:.1f} bytes/token (whole shards incl. text/NLL/offsets)")
    # the teacher's NLL matches a plain forward pass
    ids = torch.from_numpy(packing.sequences[seqs[0].sequence].astype(np.int64))[None]
    with torch.no_grad():
        logp = torch.log_softmax(teacher.model(ids).logits.float(), -1)[0]
    want = -logp[torch.arange(31), ids[0, 1:]]
    np.testing.assert_allclose(seqs[0].nll[1:], want.numpy(), rtol=1e-4, atol=1e-4)
    # a training batch from the cache
    loader = torch.utils.data.DataLoader(DistillDataset(dataset, tokenizer=teacher.tokenizer, shuffle=False),
                                         batch_size=2, collate_fn=collate_sparse)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 32) and batch["target_ids"].shape[:2] == (2, 32)
    torch.testing.assert_close(batch["target_weights"].sum(-1), torch.ones(2, 32))
    logits = torch.zeros(2, 32, 49152, requires_grad=True)
    loss = distill_loss(logits, batch, alpha=0.5)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(np.log(49152) - 0.5 * float(  # uniform student: CE = log V, KL = log V - H(t̂)
        -(torch.xlogy(batch["target_weights"], batch["target_weights"]).sum(-1)).mean()), rel=1e-4)


def test_interrupted_run_resumes_to_identical_dataset(teacher, dataset, tmp_path):
    out = str(tmp_path / "resumed")

    class Crash(Exception):
        pass

    def crash_in_second_shard(done, total):
        if done > 2:
            raise Crash
    cfg = SamplingConfig(draws=50, alignment=True)
    with pytest.raises(Crash):   # other chunking and batch size too: the dataset must not depend on them
        precompute(teacher, CORPUS, out, config=cfg, position_chunk=8, progress=crash_in_second_shard,
                   **{**SLICE, "batch_size": 1})
    assert not os.path.exists(out) and os.listdir(out + ".partial")
    finished = []
    precompute(teacher, CORPUS, out, config=cfg, position_chunk=8, progress=lambda d, t: finished.append(d), **SLICE)
    assert finished[0] == 2                                  # shard 0 was kept, not recomputed
    assert shard_hashes(out) == shard_hashes(dataset)
    assert open_dataset(out).info == open_dataset(dataset).info


def test_reader_refuses_mismatch_and_corrupt_shards(teacher, dataset, tmp_path):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(teacher.tokenizer.name_or_path)
    other.chat_template = None                               # same vocabulary, other chat template
    with pytest.raises(DatasetMismatch, match="tokenizer"):
        DistillDataset(dataset, tokenizer=other)
    with pytest.raises(DatasetMismatch, match="packing"):
        DistillDataset(dataset, packing_fingerprint="0" * 64)
    with pytest.raises(DatasetMismatch, match="seq_len"):
        DistillDataset(dataset, expect={"seq_len": 2048})
    broken = str(tmp_path / "broken")
    shutil.copytree(dataset, broken)
    shard = os.path.join(broken, "shard-00001.parquet")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    reader = iter(DistillDataset(broken, shuffle=False))
    next(reader)                                             # shard 0 is intact
    next(reader)
    with pytest.raises(IntegrityError, match="shard-00001"):
        next(reader)


def test_top_k_and_partial_run_with_other_settings(teacher, tmp_path):
    out = str(tmp_path / "topk")
    precompute(teacher, CORPUS, out, config=SamplingConfig(method="top-k", k=8), rule=RULE, max_sequences=1,
               shard_sequences=1)
    (seq,) = decode_table(open_dataset(out).read_shard("shard-00000.parquet"), 49152, 50)
    assert np.all(np.diff(seq.rows.offsets) == 8)
    assert np.all(seq.rows.logprobs <= 0) and 0 < seq.coverage < 1
    os.makedirs(str(tmp_path / "x.partial"))
    with open(str(tmp_path / "x.partial" / "job_key"), "w") as f:
        f.write("another run")
    with pytest.raises(DatasetMismatch, match="partial run"):
        precompute(teacher, CORPUS, str(tmp_path / "x"), rule=RULE, max_sequences=1)
    with pytest.raises(DatasetMismatch, match="max_sequences must be at least 1"):
        precompute(teacher, CORPUS, str(tmp_path / "y"), rule=RULE, max_sequences=0)
    with pytest.raises(DatasetMismatch, match="unknown method"):
        precompute(teacher, CORPUS, str(tmp_path / "y"), config=SamplingConfig(method="top-p"))


KILL_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from tensorstore_llm.distill.precompute import SamplingConfig, precompute
from tensorstore_llm.hf.packing import PackingRule
from tensorstore_llm.testing.real_models import smollm2_checkpoint
precompute(smollm2_checkpoint(), sys.argv[1], sys.argv[2], config=SamplingConfig(draws=50, alignment=True),
           rule=PackingRule(seq_len=32, shuffle_seed=0), max_sequences=3, shard_sequences=2, batch_size=2,
           progress=lambda done, total: time.sleep(1.0))
"""


def test_kill_9_and_rerun_gives_identical_dataset(teacher, dataset, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, CORPUS, out], stderr=subprocess.DEVNULL)
    journal = os.path.join(out + ".partial", "journal.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(journal) and os.path.getsize(journal) > 0:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the precompute finished or failed before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out) and os.path.exists(journal)
    precompute(teacher, CORPUS, out, config=SamplingConfig(draws=50, alignment=True), position_chunk=32, **SLICE)
    assert shard_hashes(out) == shard_hashes(dataset)
    assert open_dataset(out).info == open_dataset(dataset).info


def test_cached_nll_and_offsets_serve_another_tokenizer(dataset):
    """A student with a small byte-level BPE trained here (``tokenizers``) aligned to the cached SmolLM2 sequences."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tensorstore_llm.distill.align import align_sequence, teacher_guided_loss

    student = Tokenizer(models.BPE(unk_token="[UNK]"))
    student.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    student.train_from_iterator(read_corpus(CORPUS).documents, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["[UNK]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ds = DistillDataset(dataset, shuffle=False)
    seq = next(ds.sequences())
    item = align_sequence(seq, student, how="max")
    n = len(item["input_ids"])
    assert n > 32 and item["teacher_loss"].shape == (n,)                # a smaller vocabulary: more tokens
    enc = student.encode(seq.text)
    for i in (3, n // 2, n - 1):                                       # max over the covering teacher tokens
        a, b = enc.offsets[i]
        cover = [j for j, (c, d) in enumerate(seq.char_offsets) if d > a and c < b and not np.isnan(seq.nll[j])]
        want = max(seq.nll[j] for j in cover) if cover else float("nan")
        assert float(item["teacher_loss"][i]) == pytest.approx(want, nan_ok=True)
    vocab = student.get_vocab_size()                                   # the byte alphabet + merges
    logits = torch.zeros(1, n, vocab, requires_grad=True)
    loss = teacher_guided_loss(logits, item["labels"][None], item["teacher_loss"][None])
    assert loss.item() == pytest.approx(np.log(vocab), rel=1e-5)
    with pytest.raises(ValueError, match="alignment=True"):
        align_sequence(decode_table(open_dataset(dataset).read_shard("shard-00000.parquet").drop_columns(
            ["nll", "text", "char_offsets"]), 49152, 50)[0], student)


def test_precompute_into_the_store(teacher, dataset, tmp_path):
    from tensorstore_llm.store import Store

    store = Store(str(tmp_path / "store"))

    def crash(done, total):
        if done > 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):                 # interrupted in the second shard, then resumed
        precompute(teacher, CORPUS, store=store, name="kd", config=SamplingConfig(draws=50, alignment=True),
                   progress=crash, **SLICE)
    assert not store.has("kd")
    seen = []
    artifact = precompute(teacher, CORPUS, store=store, name="kd", config=SamplingConfig(draws=50, alignment=True),
                          position_chunk=32, progress=lambda done, total: seen.append(done), **SLICE)
    assert seen[0] == 2                                    # shard 0 came from the interrupted run
    assert artifact.kind == "logits" and store.resolve("kd") == artifact.id
    mine = open_dataset(dataset)
    stored = open_dataset("kd", store)
    assert stored.info == mine.info and stored.shard_names() == mine.shard_names()
    for name in mine.shard_names():
        assert stored.read_shard(name).equals(mine.read_shard(name))
    items = list(DistillDataset("kd", store=store, tokenizer=teacher.tokenizer, shuffle=False))
    in_order = DistillDataset(dataset, shuffle=False)
    assert [int(i["input_ids"][0]) for i in items] == [int(i["input_ids"][0]) for i in in_order]
    again = precompute(teacher, CORPUS, store=store, config=SamplingConfig(draws=50, alignment=True), **SLICE)
    assert again.id == artifact.id                        # same content, same artifact
