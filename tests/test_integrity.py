"""Every read is verified: corrupted, missing or edited data never flows into a new artifact.

Real stores on disk, real byte flips and deleted chunk files, the CLI end to end (issue 8).
"""
import glob
import json
import os

import pytest
import torch

from tensorstore_llm.errors import IntegrityError, InvalidTensorName, RefError
from tensorstore_llm.io.base import ChunkDigests
from tensorstore_llm.store import Store
from tensorstore_llm.testing.conformance import SinkConformance


def _chunks(artifact, tensor):
    files = glob.glob(os.path.join(artifact.path, "tensors", tensor, "c", "**", "*"), recursive=True)
    return sorted(f for f in files if os.path.isfile(f))


def _flip(path, offset=100):
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0x01
    open(path, "wb").write(bytes(data))


def _commit(store, tensors, key="job-x", compression="none"):
    writer = store.create(key, compression)
    SinkConformance.write_all(None, writer, tensors, rows_per_block=1 << 20)   # whole tensors: chunk-aligned writes
    return writer.commit(kind="checkpoint")


@pytest.fixture
def imported(tmp_path, small_family, cli):
    s = str(tmp_path / "store")
    for name in ("base", "ft1"):
        code, _, err = cli("-q", "--store", s, "import", small_family[name], "--name", name)
        assert code == 0, err
    return s


def _artifact_count(s):
    return len(Store(s).list())


@pytest.mark.parametrize("command", [
    ["weighted-sum", "base", "ft1", "--weights", "0.5,0.5", "--name", "out"],
    ["convert", "base", "--dtype", "fp16", "--name", "out"],
    ["merge", "RECIPE", "--name", "out"],
    ["export", "base", "OUTDIR"],
])
def test_flipped_byte_fails_every_reader_and_commits_nothing(imported, tmp_path, cli, command):
    store = Store(imported)
    base = store.get("base")
    target = "model.layers.0.mlp.up_proj.weight"
    _flip(_chunks(base, target)[0])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: base\n    parameters: {weight: 0.5}\n"
                      "  - model: ft1\n    parameters: {weight: 0.5}\n")
    out_dir = tmp_path / "exported"
    args = [str(recipe) if a == "RECIPE" else str(out_dir) if a == "OUTDIR" else a for a in command]
    before = _artifact_count(imported)
    code, out, err = cli("-q", "--store", imported, *args)
    assert code == 5, (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1
    assert base.short_id in err and target in err and "chunk 0" in err
    assert _artifact_count(imported) == before and not store.has("out")
    assert not out_dir.exists()


def test_missing_chunk_is_an_error_not_zeros(imported, tmp_path, cli):
    base = Store(imported).get("base")
    os.remove(_chunks(base, "model.embed_tokens.weight")[0])
    code, _, err = cli("-q", "--store", imported, "export", "base", str(tmp_path / "out"))
    assert code == 5 and "missing" in err and "model.embed_tokens.weight" in err
    assert not (tmp_path / "out").exists()


def test_hand_edited_manifest_checksum_is_refused(imported, tmp_path, cli):
    base = Store(imported).get("base")
    path = os.path.join(base.path, "manifest.json")
    body = json.load(open(path))
    name = "model.norm.weight"
    body["tensors"][name]["checksum"] = "sha256:" + "0" * 64
    json.dump(body, open(path, "w"))
    code, _, err = cli("-q", "--store", imported, "export", "base", str(tmp_path / "out"))
    assert code == 5 and "edited or damaged" in err
    assert not (tmp_path / "out").exists()
    code, _, err = cli("-q", "--store", imported, "verify", "base")
    assert code == 5


def test_row_block_reads_check_only_their_chunks(store):
    w = torch.randn(9000, 512)          # 2 MiB per 1024 rows: several 8 MiB chunks
    art = _commit(store, {"w": w})
    digests = art.manifest.tensors["w"].chunks
    assert digests is not None and len(digests.digests) == -(-9000 // digests.rows) > 1
    _flip(_chunks(art, "w")[1])
    with store.open(art.id) as src:
        rows = digests.rows
        assert torch.equal(src.read_rows("w", 0, rows), w[:rows])          # chunk 0 is fine
        assert torch.equal(src.read_rows("w", 5, 17), w[5:17])            # unaligned, inside chunk 0
        with pytest.raises(IntegrityError, match=r"'w' chunk 1 .*checksum mismatch"):
            src.read_rows("w", rows + 3, rows + 4)                          # one row of chunk 1
        with pytest.raises(IntegrityError):
            src.read("w")


def test_compressed_artifacts_are_checked_too(store):
    w = torch.randn(4096, 1024).to(torch.bfloat16)
    art = _commit(store, {"w": w}, compression="zstd")
    with store.open(art.id) as src:
        assert torch.equal(src.read("w"), w)
    files = _chunks(art, "w")
    os.remove(files[-1])
    with store.open(art.id) as src, pytest.raises(IntegrityError, match="missing"):
        src.read("w")


def test_compressed_chunk_with_flipped_byte(store):
    w = torch.randn(2048, 256)
    art = _commit(store, {"w": w}, compression="lz4")
    _flip(_chunks(art, "w")[0], offset=400)
    with store.open(art.id) as src, pytest.raises(IntegrityError):
        src.read("w")


def _strip_chunk_digests(artifact):
    """Make ``artifact`` look like one written before chunk digests existed."""
    path = os.path.join(artifact.path, "manifest.json")
    body = json.load(open(path))
    for record in body["tensors"].values():
        record.pop("chunks", None)
    json.dump(body, open(path, "w"))


def test_old_artifacts_read_verified_whole_and_upgrade_keeps_the_id(store, cli):
    w = torch.randn(6000, 512)
    art = _commit(store, {"w": w, "b": torch.randn(7)})
    _strip_chunk_digests(art)
    assert set(store.needs_upgrade(art.id)) == {"w", "b"}
    with store.open(art.id) as src:   # still readable, whole and in row blocks
        assert torch.equal(src.read("w"), w)
        assert torch.equal(torch.cat([src.read_rows("w", a, min(6000, a + 1000)) for a in range(0, 6000, 1000)]), w)
    code, out, err = cli("--store", store.root, "verify", "--upgrade", art.id[:12])
    assert code == 0 and "added chunk checksums to 2 tensors" in out, err
    upgraded = store.get(art.id)
    assert upgraded.id == art.id and store.needs_upgrade(art.id) == []
    assert isinstance(upgraded.manifest.tensors["w"].chunks, ChunkDigests)
    with store.open(art.id) as src:
        assert torch.equal(src.read("w"), w)


def test_old_artifact_corruption_caught_when_read_whole(store):
    w = torch.randn(6000, 512)
    art = _commit(store, {"w": w})
    _strip_chunk_digests(art)
    _flip(_chunks(art, "w")[0])
    with store.open(art.id) as src, pytest.raises(IntegrityError, match="'w' is corrupted"):
        src.read("w")
    with store.open(art.id) as src, pytest.raises(IntegrityError):   # front to back in blocks
        for a in range(0, 6000, 1000):
            src.read_rows("w", a, min(6000, a + 1000))
    with pytest.raises(IntegrityError):
        store.verify(art.id, upgrade=True)
    assert store.needs_upgrade(art.id) == ["w"]     # nothing written for a corrupt artifact


def test_verify_checks_id_against_content_and_directory(store):
    a = _commit(store, {"w": torch.randn(4, 4)}, "job-a")
    b = _commit(store, {"w": torch.randn(4, 4)}, "job-b")
    # a manifest moved under another artifact's directory: its id and the directory disagree
    os.replace(os.path.join(a.path, "manifest.json"), os.path.join(b.path, "manifest.json"))
    with pytest.raises(IntegrityError, match="does not match its artifact id"):
        store.verify(b.id)


def test_ls_skips_and_reports_damaged_entries(store, cli):
    good = _commit(store, {"w": torch.randn(4, 4)}, "job-a")
    bad = _commit(store, {"w": torch.randn(5, 4)}, "job-b")
    manifest = os.path.join(bad.path, "manifest.json")
    data = open(manifest, "rb").read()
    open(manifest, "wb").write(data[: len(data) // 2])      # truncated
    os.makedirs(os.path.join(store.root, "artifacts", "stray-directory"))
    open(os.path.join(store.root, "artifacts", "stray-file"), "w").write("x")
    damaged = []
    assert [a.id for a in store.list(damaged=damaged)] == [good.id]
    assert {d[0] for d in damaged} == {bad.id, "stray-directory", "stray-file"}
    code, out, err = cli("--store", store.root, "ls")
    assert code == 0 and good.short_id in out and bad.short_id not in out
    assert err.count("skipped damaged entry") == 3


def test_tags_hold_ids_only_and_hide_temporaries(store, cli):
    art = _commit(store, {"w": torch.randn(4, 4)})
    store.tag(art.id, "best")
    tags_dir = os.path.join(store.root, "tags")
    assert os.listdir(tags_dir) == ["best"]                     # no temporary left visible
    open(os.path.join(tags_dir, "best.tmp-4242"), "w").write(art.id)      # an old version's leftover
    open(os.path.join(tags_dir, "evil"), "w").write("../../etc")
    assert store.tags() == {"best": art.id}
    with pytest.raises(RefError, match="does not hold an artifact id"):
        store.get("evil")
    code, _, err = cli("--store", store.root, "show", "evil")
    assert code == 3 and "does not hold an artifact id" in err
    with pytest.raises(RefError):
        store.tag(art.id, "x.tmp-12")


def test_gc_does_not_follow_symlinked_staging(store, tmp_path):
    _commit(store, {"w": torch.randn(4, 4)})
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    link = os.path.join(store.root, "staging", "job-link")
    os.symlink(outside, link)
    removed = store.gc()
    assert link in removed and not os.path.lexists(link)
    assert sorted(os.listdir(outside)) == ["keep.txt"]          # target untouched, no .lock made


@pytest.mark.parametrize("name,why", [("\ud800", "lone surrogate"), ("zarr.json", "reserved")])
def test_bad_tensor_names_are_clear_errors(tmp_path, cli, name, why):
    header = {name: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()             # json escapes the surrogate as \ud800
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    code, _, err = cli("--store", str(tmp_path / "s"), "import", str(path))
    assert code == 6, err
    assert err.startswith("error: ") and err.count("\n") == 1 and why in err


def test_store_api_refuses_bad_names_directly(store):
    writer = store.create("job-n")
    with pytest.raises(InvalidTensorName):
        SinkConformance.write_all(None, writer, {"zarr.json": torch.randn(2)})


def test_tsllm_gc_removes_a_killed_exports_partial(tmp_path, small_family):
    import signal
    import subprocess
    import sys
    import time

    from conftest import run_tsllm
    root = str(tmp_path / "store")
    assert run_tsllm("--store", root, "import", small_family["base"], "--name", "base").returncode == 0
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "tensorstore_llm_cli", "--store", root, "export", "base", str(out),
                             "--max-memory", "256K"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    partials = []
    while time.time() < deadline and not partials:
        partials = [p for p in glob.glob(str(tmp_path / ".out.tsllm-partial-*"))
                    if os.path.exists(os.path.join(p, "journal.jsonl"))]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partials and os.path.isdir(partials[0])
    done = run_tsllm("--store", root, "gc")
    assert done.returncode == 0 and partials[0] in done.stdout, done.stdout + done.stderr
    assert not os.path.lexists(partials[0]) and not out.exists()


def test_import_and_export_refuse_int8_casts_of_float_weights(tmp_path, small_family, cli):
    s = str(tmp_path / "store")
    code, _, err = cli("--store", s, "import", small_family["base"], "--dtype", "int8")
    assert code == 6 and "not a float dtype" in err
    assert Store(s).list() == []
    assert cli("-q", "--store", s, "import", small_family["base"], "--name", "base")[0] == 0
    code, _, err = cli("--store", s, "export", "base", str(tmp_path / "out"), "--dtype", "int8")
    assert code == 6 and "not a float dtype" in err and not (tmp_path / "out").exists()


def test_verify_hashes_each_chunk_once(store, monkeypatch):
    """verify leaves chunk digests to the reader (which checks them as it reads); the flipped chunk is still caught."""
    from tensorstore_llm.io import base

    w = torch.randn(9000, 512)
    art = _commit(store, {"w": w})
    calls = []
    real = base.RowHasher._update_chunks
    monkeypatch.setattr(base.RowHasher, "_update_chunks", lambda self, *a: calls.append(1) or real(self, *a))
    store.verify(art.id)
    assert calls == []
    _flip(_chunks(art, "w")[1])
    with pytest.raises(IntegrityError, match="chunk 1"):
        store.verify(art.id)
