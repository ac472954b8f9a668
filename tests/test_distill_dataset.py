"""The training reader: rank / worker shares, per-epoch order, padding, and the shard writer's checks."""
import json
import os

import numpy as np
import pytest
import torch

from tensorstore_llm.distill import sampling
from tensorstore_llm.distill.dataset import DistillDataset, collate_sparse, to_item
from tensorstore_llm.distill.encoding import SequenceTargets, encode_rows
from tensorstore_llm.distill.shards import ShardWriter, open_dataset
from tensorstore_llm.errors import DatasetMismatch, IntegrityError, OutputExists

V, L, N = 300, 8, 20

# small tensors: one intra-op thread is several times faster than two on a shared 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_dataset(path, sequences=10, per_shard=2, seed=0):
    """A small RS-KD dataset from random teacher distributions, written through ShardWriter."""
    writer = ShardWriter(path, job_key="test")
    files = {}
    g = torch.Generator().manual_seed(seed)
    for k in range(0, sequences, per_shard):
        seqs = []
        for i in range(k, min(sequences, k + per_shard)):
            probs = torch.softmax(3 * torch.randn(L, V, generator=g), -1)
            rows = sampling.rs_kd(probs, sampling.sequence_uniforms(seed, i, L, N, 0, L))
            seqs.append(SequenceTargets(i, np.full(L, i, dtype=np.int32), rows))
        name = f"shard-{k // per_shard:05d}.parquet"
        files[name] = {"sha256": writer.write_shard(name, encode_rows("rs-kd", seqs, V, N))}
    info = {"vocab": V, "seq_len": L, "kind": "rs-kd", "sampling": {"draws": N}, "tokenizer": "t",
            "packing_fingerprint": "p"}
    return writer.commit(kind="logits", parents=[], info=info, files=files)


def seen(ds, epoch=0, workers=0):
    ds.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    return [int(item["input_ids"][0]) for item in loader]


@pytest.mark.parametrize("sequences,per_shard", [(10, 2), (6, 3)])   # 5 shards; 2 shards (< 4 consumers)
def test_ranks_and_workers_get_disjoint_covering_shares(tmp_path, sequences, per_shard):
    path = make_dataset(str(tmp_path / "ds"), sequences, per_shard)
    shares = [seen(DistillDataset(path, rank=r, world_size=2), workers=2) for r in range(2)]
    flat = shares[0] + shares[1]
    assert sorted(flat) == list(range(sequences)) and len(set(flat)) == len(flat)
    assert all(shares)
    again = [seen(DistillDataset(path, rank=r, world_size=2), workers=2) for r in range(2)]
    assert again == shares                                         # deterministic per epoch


def test_epoch_changes_shard_order(tmp_path):
    path = make_dataset(str(tmp_path / "ds"), 10, 1)
    ds = DistillDataset(path)
    orders = {tuple(seen(ds, epoch=e)) for e in range(4)}
    assert len(orders) > 1 and all(sorted(o) == list(range(10)) for o in orders)
    assert seen(DistillDataset(path, shuffle=False)) == list(range(10))


def test_items_and_padding(tmp_path):
    path = make_dataset(str(tmp_path / "ds"), 2, 2)
    ds = DistillDataset(path, shuffle=False)
    items = list(ds)
    batch = collate_sparse(items)
    K = batch["target_ids"].shape[-1]
    assert K == max(it["target_ids"].shape[-1] for it in items)
    torch.testing.assert_close(batch["target_weights"].sum(-1), torch.ones(2, L))
    assert not batch["target_weights"][~batch["target_mask"]].any()
    seq = next(ds.sequences())
    dense = sampling.dense_targets(seq.rows, V, N)
    item = to_item(seq, N)
    rebuilt = torch.zeros(L, V, dtype=torch.float64)
    rebuilt.scatter_add_(1, item["target_ids"], item["target_weights"].double() * item["target_mask"])
    torch.testing.assert_close(rebuilt, dense)


def test_shard_writer_resume_and_refusals(tmp_path):
    path = str(tmp_path / "ds")
    make_dataset(path, 4, 2)
    with pytest.raises(OutputExists):
        ShardWriter(path)
    partial = str(tmp_path / "p")
    w = ShardWriter(partial, job_key="a")
    table = encode_rows("rs-kd", [SequenceTargets(0, np.zeros(L, np.int32),
                                                  sampling.rs_kd(torch.full((L, V), 1 / V), torch.rand(L, N)))], V, N)
    digest = w.write_shard("shard-00000.parquet", table)
    assert ShardWriter(partial, job_key="a").completed_shards() == {"shard-00000.parquet": digest}
    with open(os.path.join(partial + ".partial", "shard-00000.parquet"), "r+b") as f:   # damaged after journalling
        f.seek(20)
        f.write(b"\xff\xff")
    assert ShardWriter(partial, job_key="a").completed_shards() == {}
    with pytest.raises(DatasetMismatch, match="partial run with other settings"):
        ShardWriter(partial, job_key="b")
    ds = open_dataset(path)
    with open(os.path.join(path, "shard-00000.parquet"), "r+b") as f:
        f.seek(30)
        f.write(b"\x00\x01\x02")
    with pytest.raises(IntegrityError, match="corrupt or truncated"):
        ds.read_shard("shard-00000.parquet")
    assert json.load(open(os.path.join(path, "dataset.json")))["kind"] == "logits"


def test_narrow_teacher_head_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tensorstore_llm.hf.models import check_vocab

    class FakeTokenizer:
        def __len__(self):
            return 120
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(DatasetMismatch, match="100 columns but its tokenizer has 120"):
        check_vocab(model, FakeTokenizer())
    model_padded = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    assert check_vocab(model_padded, FakeTokenizer()) == 128       # padded heads are fine: columns dropped
    from tensorstore_llm.hf.models import head_logits

    hidden = torch.randn(3, 16)
    logits = head_logits(model_padded, hidden, 120)
    assert logits.shape == (3, 120) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, model_padded.lm_head(hidden)[:, :120])


def test_hf_trainer_trains_from_the_cache(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from tensorstore_llm.distill.losses import distill_loss
    from tensorstore_llm.distill.trainer import distill_trainer

    path = make_dataset(str(tmp_path / "ds"), 4, 2)
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2))
    before = student.lm_head.weight.detach().clone()
    args = TrainingArguments(str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True)
    trainer = distill_trainer(student, args, train_dataset=DistillDataset(path, shuffle=False), alpha=0.7)
    batch = collate_sparse(list(DistillDataset(path, shuffle=False))[:2])
    with torch.no_grad():
        want = distill_loss(student(input_ids=batch["input_ids"]).logits, batch, alpha=0.7)
        got = trainer.compute_loss(student, dict(batch))
    torch.testing.assert_close(got, want)
    result = trainer.train()
    assert result.global_step == 3 and np.isfinite(result.training_loss)
    assert not torch.equal(before, student.lm_head.weight)


def test_multi_teacher_average_and_choice(tmp_path):
    from tensorstore_llm.distill.dataset import MultiTeacherDataset

    a = make_dataset(str(tmp_path / "a"), 4, 2, seed=0)
    b = make_dataset(str(tmp_path / "b"), 4, 2, seed=1)       # another "teacher", same packing
    avg = MultiTeacherDataset([a, b], [3, 1], shuffle=False)
    seqs_a = list(DistillDataset(a, shuffle=False).sequences())
    seqs_b = list(DistillDataset(b, shuffle=False).sequences())
    for item, sa, sb in zip(avg, seqs_a, seqs_b):
        want = 0.75 * sampling.dense_targets(sa.rows, V, N) + 0.25 * sampling.dense_targets(sb.rows, V, N)
        got = torch.zeros(L, V, dtype=torch.float64)
        got.scatter_add_(1, item["target_ids"], item["target_weights"].double() * item["target_mask"])
        torch.testing.assert_close(got, want)
        assert len(set(item["target_ids"][0][item["target_mask"][0]].tolist())) == int(item["target_mask"][0].sum())
    choice = MultiTeacherDataset([a, b], [0.5, 0.5], mode="choice", shuffle=False)
    picks = []
    for item, sa, sb in zip(choice, seqs_a, seqs_b):
        dense = torch.zeros(L, V, dtype=torch.float64)
        dense.scatter_add_(1, item["target_ids"], item["target_weights"].double() * item["target_mask"])
        picks.append(0 if torch.allclose(dense, sampling.dense_targets(sa.rows, V, N)) else 1)
        assert torch.allclose(dense, sampling.dense_targets([sa, sb][picks[-1]].rows, V, N))
    assert picks == [0 if torch.equal(x["target_ids"], y["target_ids"]) else 1 for x, y in zip(
        MultiTeacherDataset([a, b], [0.5, 0.5], mode="choice", shuffle=False), DistillDataset(a, shuffle=False))]
    c = make_dataset(str(tmp_path / "c"), 4, 1)                # other shard layout
    with pytest.raises(DatasetMismatch, match="other shards"):
        MultiTeacherDataset([a, c])
