"""Store behaviour: ids, tags, refs, verify, gc, compression, carried files."""
import glob
import hashlib
import os

import pytest
import torch

from tensorstore_llm import api
from tensorstore_llm.errors import ArtifactNotFound, IntegrityError, RefError, StorageError
from tensorstore_llm.testing.conformance import SinkConformance, same_bits, sample_tensors


def _commit(store, tensors, key="job-x", compression="none", **kw):
    writer = store.create(key, compression)
    SinkConformance.write_all(None, writer, tensors)
    return writer.commit(kind="checkpoint", **kw)


def test_same_content_same_id_and_no_duplicate(store):
    t = {"w": torch.randn(8, 8)}
    a = _commit(store, t, "job-1")
    b = _commit(store, t, "job-2")
    assert a.id == b.id and len(store.list()) == 1
    c = _commit(store, {"w": t["w"] + 1}, "job-3")
    assert c.id != a.id


def test_manifest_records_everything(store, tiny_family):
    art = api.import_checkpoint(tiny_family["base"], store, name="base", progress=False).artifact
    m = art.manifest
    assert m.kind == "checkpoint" and m.source["type"] == "hf-dir"
    assert set(m.files) == {"config.json", "generation_config.json"}
    assert m.tool["name"] == "tensorstore_llm" and m.created_at
    rec = m.tensors["model.embed_tokens.weight"]
    assert rec.dtype == "bfloat16" and rec.shape == (512, 64) and rec.checksum.startswith("sha256:")
    # the checksum is the sha256 of the tensor's bytes as they sit in the safetensors file
    from tensorstore_llm.dtypes import raw_bytes
    from tensorstore_llm.io.hf_dir import HFCheckpointSource
    with HFCheckpointSource(tiny_family["base"]) as src:
        expected = hashlib.sha256(bytes(raw_bytes(src.read("model.embed_tokens.weight")))).hexdigest()
    assert rec.checksum == "sha256:" + expected
    with open(os.path.join(art.path, "files", "config.json"), "rb") as f, open(os.path.join(tiny_family["base"], "config.json"), "rb") as g:
        assert f.read() == g.read()


def test_refs_tags_and_prefixes(store):
    a = _commit(store, {"w": torch.zeros(2)}, "job-a")
    assert store.resolve(a.id[:8]) == a.id
    store.tag(a.id, "base")
    assert store.get("base").id == a.id
    b = _commit(store, {"w": torch.ones(2)}, "job-b")
    with pytest.raises(RefError, match="already points"):
        store.tag(b.id, "base", force=False)
    assert store.tag(b.id, "base") == a.id
    assert store.tags() == {"base": b.id}
    for bad in ("../x", "", "a/b", "deadbeef"):
        with pytest.raises(RefError):
            store.tag(a.id, bad)
    with pytest.raises(ArtifactNotFound):
        store.get("nothing-here")
    store.untag("base")
    with pytest.raises(ArtifactNotFound):
        store.get("base")


def test_verify_catches_a_flipped_byte(store):
    a = _commit(store, {"w": torch.randn(64, 64)})
    store.verify(a.id)
    chunk = sorted(glob.glob(os.path.join(a.path, "tensors", "w", "c", "**", "*"), recursive=True))
    chunk = [c for c in chunk if os.path.isfile(c)][0]
    data = bytearray(open(chunk, "rb").read())
    data[100] ^= 0x01
    open(chunk, "wb").write(bytes(data))
    with pytest.raises(IntegrityError, match="'w'.*checksum"):
        store.verify(a.id)


def test_verify_catches_a_deleted_chunk_read_as_fill_value(store):
    a = _commit(store, {"w": torch.randn(64, 64)})
    for chunk in glob.glob(os.path.join(a.path, "tensors", "w", "c", "**", "*"), recursive=True):
        if os.path.isfile(chunk):
            os.remove(chunk)
    with pytest.raises(IntegrityError):
        store.verify(a.id)


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_compression_round_trips_bit_exact(store, compression):
    tensors = sample_tensors()
    a = _commit(store, tensors, compression=compression)
    with store.open(a.id) as src:
        for name, t in tensors.items():
            assert same_bits(src.read(name), t)
    store.verify(a.id)


def test_staging_is_never_listed_and_gc_removes_it(store):
    writer = store.create("job-left")
    writer.prepare([])
    assert store.list() == []
    with pytest.raises(StorageError, match="already running"):
        store.create("job-left")
    assert store.gc() == []  # held by a live writer
    writer.close()
    removed = store.gc()
    assert len(removed) == 1 and not os.path.exists(removed[0])


def test_commit_refuses_unfinished(store):
    from tensorstore_llm.io.base import TensorMeta

    writer = store.create("job-u")
    writer.prepare([TensorMeta("w", (4,), "float32")])
    with pytest.raises(ValueError, match="unfinished"):
        writer.commit(kind="checkpoint")
    writer.abort()
    assert store.list() == []


def test_raw_chunk_files_are_what_zarr_reads_and_writes(store, tmp_path):
    """The direct chunk I/O path and zarr-python agree in both directions."""
    import numpy as np
    import zarr

    from tensorstore_llm.dtypes import from_storage, to_storage
    from tensorstore_llm.io.zarr_tensors import ZarrTensorSource

    tensors = sample_tensors()
    tensors["big"] = torch.randn(20, 300_000).to(torch.bfloat16)  # 13-row chunks: a padded edge chunk
    for rows_per_block in (7, 1024):  # unaligned blocks go through zarr, aligned ones direct
        art = _commit(store, tensors, key=f"job-{rows_per_block}")
        for name, t in tensors.items():
            stored = zarr.open_array(os.path.join(art.path, "tensors", name), mode="r")
            assert same_bits(from_storage(np.asarray(stored[...]), str(t.dtype).removeprefix("torch.")), t), name
    # zarr writes, the direct path reads
    root = tmp_path / "zarr-written"
    group = zarr.open_group(str(root / "tensors"), mode="w", zarr_format=3)
    from tensorstore_llm.io.base import TensorMeta
    from tensorstore_llm.io.zarr_tensors import chunk_shape
    metas = {}
    for name, t in tensors.items():
        meta = TensorMeta(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))
        a = group.create_array(name, shape=meta.shape, dtype=to_storage(t).dtype, chunks=chunk_shape(meta), compressors=None, fill_value=0)
        a[...] = to_storage(t)
        metas[name] = meta
    with ZarrTensorSource(str(root), metas, "x") as src:
        for name, t in tensors.items():
            assert same_bits(src.read(name), t), name
            if t.dim() and t.shape[0] > 3:
                assert same_bits(src.read_rows(name, 1, t.shape[0] - 1), t[1:-1]), name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64", "int8", "uint8", "int16", "int32",
                                   "int64", "bool", "float8_e4m3fn"])
@pytest.mark.parametrize("shape", [(), (7,), (5000, 3), (0, 4)])
def test_array_metadata_is_what_zarr_writes(tmp_path, dtype, shape):
    """Uncompressed arrays get their zarr.json from us (no zarr import on the write path): it
    must be exactly what zarr-python writes for the same array."""
    import json

    import zarr

    from tensorstore_llm.dtypes import by_name
    from tensorstore_llm.io.base import TensorMeta
    from tensorstore_llm.io.zarr_tensors import GROUP_METADATA, array_metadata, chunk_shape

    meta = TensorMeta("t", shape, dtype)
    group = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3)
    group.create_array("t", shape=shape, dtype=by_name(dtype).storage, chunks=chunk_shape(meta), compressors=None,
                       fill_value=0, attributes={"dtype": by_name(dtype).name})
    with open(tmp_path / "g" / "t" / "zarr.json") as f:
        assert json.load(f) == array_metadata(meta)
    with open(tmp_path / "g" / "zarr.json") as f:
        assert json.load(f) == GROUP_METADATA


def test_background_durability_drains_and_ignores_vanished_files(tmp_path):
    from tensorstore_llm.io.fsutil import DurableInBackground

    durable = DurableInBackground()
    for i in range(3):
        (tmp_path / f"f{i}").write_bytes(b"x" * 4096)
        durable.add(str(tmp_path / f"f{i}"))
    durable.add(str(tmp_path / "gone"))      # removed before it was synced: fsync_tree reports such things
    durable.drain()
    assert durable._thread is None
    durable.drain()                           # idempotent


def test_id_does_not_depend_on_run_settings(tmp_path, tiny_family, cli):
    """An import with another --seed or device is the same artifact (format 2 ids)."""
    from tensorstore_llm.store import Store

    s = str(tmp_path / "s")
    assert cli("-q", "--store", s, "import", tiny_family["base"], "--name", "a")[0] == 0
    first = Store(s).get("a")
    writer = Store(s).create("job-again")
    with Store(s).open("a") as src:
        writer.prepare(src.metas())
        for m in src.metas():
            writer.write_rows(m.name, 0, src.read(m.name))
            writer.finish(m.name)
    again = writer.commit(kind=first.kind, parents=first.manifest.parents, source=first.manifest.source,
                          recipe=first.manifest.recipe, files=Store(s).carried_files("a"),
                          run={"seed": 7, "device": "cuda:0"})
    assert again.id == first.id


def test_format_1_manifests_keep_their_ids(store):
    import json as _json

    from tensorstore_llm.store.manifest import Manifest

    art = _commit(store, {"w": torch.randn(3, 3)}, run={"seed": 5})
    path = os.path.join(art.path, "manifest.json")
    body = _json.load(open(path))
    body["format"] = "tsllm-artifact/1"
    old = Manifest.from_json(_json.dumps(body).encode(), path)
    assert old.content_id() != art.id          # format 1 hashed the run settings too
    old.id = old.content_id()
    assert Manifest.from_json(old.to_json(), path).content_id() == old.id


def test_lineage_tree_from_the_store(store, tiny_family):
    a = api.import_checkpoint(tiny_family["base"], store, name="base", progress=False).artifact
    b = api.import_checkpoint(tiny_family["ft1"], store, name="ft1", progress=False).artifact
    out = api.weighted_sum(store, ["base", "ft1"], [0.5, 0.5], name="soup", progress=False).artifact
    tree = store.lineage("soup")
    assert tree.role is None and tree.id == out.id
    assert [c.id for c in tree.children] == [a.id, b.id]
    assert tree.children[0].children == [] and tree.children[0].artifact.manifest.source["type"] == "hf-dir"
    import shutil
    shutil.rmtree(a.path)
    assert store.lineage("soup").children[0].missing
