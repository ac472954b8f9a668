"""Dataset artifacts (Arrow / Parquet shards) in the store: staged, checksummed, verified on read,
resumable, and invisible until committed, like tensor artifacts."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from tensorstore_llm.errors import FormatError, IntegrityError
from tensorstore_llm.store import Store, job_key


def _table(seed, rows=1000):
    return pa.table({"seq": pa.array(range(seed, seed + rows), pa.int64()),
                     "ids": pa.array([bytes([i % 251]) * (i % 7) for i in range(rows)], pa.binary())})


def _write(store, key="job-ds", shards=3, info=None):
    writer = store.create_dataset(key)
    for i in range(shards):
        writer.write_shard(f"shard-{i:05d}.parquet", _table(i * 1000))
    return writer.commit(kind="dataset", info=info or {"fingerprint": "abc"})


def test_write_read_verify_and_same_content_same_id(store):
    art = _write(store)
    assert art.kind == "dataset" and art.manifest.info == {"fingerprint": "abc"}
    with store.open_dataset(art.id) as ds:
        assert ds.shards() == [f"shard-{i:05d}.parquet" for i in range(3)]
        assert ds.read_shard("shard-00001.parquet").equals(_table(1000))
        assert ds.read_shard("shard-00001.parquet", columns=["seq"]).column("seq").to_pylist()[:2] == [1000, 1001]
        assert ds.info == {"fingerprint": "abc"}
    assert store.verify(art.id).id == art.id
    assert _write(store, "job-other").id == art.id            # content id: same shards, same info
    assert _write(store, "job-third", info={"fingerprint": "xyz"}).id != art.id
    assert [a.kind for a in store.list()] == ["dataset", "dataset"]


def test_flipped_byte_and_truncation_are_caught(store):
    art = _write(store)
    path = os.path.join(art.path, "data", "shard-00002.parquet")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))
    with store.open_dataset(art.id) as ds:
        assert ds.read_shard("shard-00000.parquet").num_rows == 1000
        with pytest.raises(IntegrityError, match="shard-00002.parquet.*checksum mismatch"):
            ds.read_shard("shard-00002.parquet")
    with pytest.raises(IntegrityError):
        store.verify(art.id)
    open(path, "wb").write(bytes(data[:100]))
    with store.open_dataset(art.id) as ds, pytest.raises(IntegrityError, match="has 100 bytes"):
        ds.read_shard("shard-00002.parquet")
    os.remove(path)
    with store.open_dataset(art.id) as ds, pytest.raises(IntegrityError, match="missing"):
        ds.read_shard("shard-00002.parquet")


def test_resume_keeps_verified_shards_and_redoes_damaged_ones(store):
    writer = store.create_dataset("job-r")
    writer.write_shard("a.parquet", _table(0))
    writer.write_shard("b.parquet", _table(5))
    writer.close()
    bad = os.path.join(store.root, "staging", "job-r", "data", "b.parquet")
    open(bad, "r+b").write(b"XXXX")
    writer = store.create_dataset("job-r")
    assert list(writer.completed_shards()) == ["a.parquet"]
    writer.write_shard("b.parquet", _table(5))
    art = writer.commit(kind="dataset")
    assert art.id == _write_two(store).id


def test_resume_rewrites_a_journaled_shard_that_is_not_parquet(store):
    # bytes that hash as journaled but do not parse: resumed, they were recorded with 0 rows in the manifest
    writer = store.create_dataset("job-np")
    writer.write_shard("a.parquet", _table(0))
    writer.write_shard("b.parquet", _table(5))
    writer.close()
    staging = os.path.join(store.root, "staging", "job-np")
    junk = b"not a parquet file"
    with open(os.path.join(staging, "data", "b.parquet"), "wb") as f:
        f.write(junk)
    with open(os.path.join(staging, "shards.jsonl"), "ab") as f:
        f.write(json.dumps({"name": "b.parquet", "checksum": "sha256:" + hashlib.sha256(junk).hexdigest()}).encode() + b"\n")
    writer = store.create_dataset("job-np")
    assert list(writer.completed_shards()) == ["a.parquet"]
    writer.write_shard("b.parquet", _table(5))
    art = writer.commit(kind="dataset")
    assert [art.manifest.shards[n].rows for n in ("a.parquet", "b.parquet")] == [1000, 1000]
    assert art.id == _write_two(store).id


def _write_two(store):
    writer = store.create_dataset("job-two")
    writer.write_shard("a.parquet", _table(0))
    writer.write_shard("b.parquet", _table(5))
    return writer.commit(kind="dataset")


def test_kill_9_while_writing_leaves_nothing_visible(tmp_path):
    root = str(tmp_path / "store")
    script = textwrap.dedent(f"""
        import pyarrow as pa, sys, time
        from tensorstore_llm.store import Store
        w = Store({root!r}).create_dataset("job-k")
        for i in range(10000):
            w.write_shard(f"s-{{i:05d}}.parquet", pa.table({{"x": pa.array(range(i, i + 20000))}}))
            if i == 3:
                print("ready", flush=True)
        """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(root)
    assert store.list() == []
    writer = store.create_dataset("job-k")                # resumes from what survived, verified
    done = writer.completed_shards()
    assert len(done) >= 4
    art = writer.commit(kind="dataset")
    with store.open_dataset(art.id) as ds:
        for name in ds.shards():
            ds.read_shard(name)


def test_tensor_reads_of_a_dataset_are_refused(store):
    art = _write(store)
    with pytest.raises(FormatError, match=f"artifact {art.short_id} \\(dataset\\) is a dataset.*open_dataset"):
        store.open(art.id)
    assert job_key("logits", 1) == job_key("logits", 1)


def test_kind_info_is_typed_and_versioned(store):
    from tensorstore_llm.errors import FormatError

    writer = store.create_dataset("job-l")
    writer.write_shard("a.parquet", _table(0))
    with pytest.raises(FormatError, match="logits info lacks 'fingerprint'"):
        writer.commit(kind="logits", info={"kind": "rs-kd"})
    info = {"fingerprint": "f" * 64, "kind": "rs-kd", "tokenizer": "t", "packing": {}, "sampling": {},
            "vocab": 49152, "seq_len": 128}
    with pytest.raises(FormatError, match="'vocab' is str, expected int"):
        writer.commit(kind="logits", info={**info, "vocab": "49152"})
    art = writer.commit(kind="logits", info=info)
    assert art.manifest.info_schema == "logits/1" and store.get(art.id).manifest.info == info
    assert _write(store, "job-free").manifest.info_schema is None          # datasets: free-form info
