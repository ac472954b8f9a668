"""`tsllm apply DIFF --onto BASE -o DIR` writes once, straight into the directory (the store keeps an
export record of the lineage); --keep-artifact keeps the checkpoint too; a failure half-way
leaves neither a directory, nor its staging, nor a record."""
import glob
import os

import torch
from safetensors.torch import load_file

from tensorstore_llm.store import Store


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _load(path):
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def _assert_same_bits(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(_bits(got[k]), _bits(want[k])), k


def _store_with_diff(cli, tmp_path, family):
    root = str(tmp_path / "store")
    for args in (("import", family["base"], "--name", "base"), ("diff", family["ft1"], "--base", "base", "--name", "d")):
        code, _, err = cli("--store", root, *args)
        assert code == 0, err
    return root


def test_apply_into_dir_is_one_write_with_lineage(tmp_path, cli, tiny_family):
    root = _store_with_diff(cli, tmp_path, tiny_family)
    before = {a.id for a in Store(root).list()}
    out_dir = str(tmp_path / "ft-again")
    code, out, err = cli("--store", root, "apply", "d", "--onto", "base", "-o", out_dir, "--name", "again",
                         "--max-shard-size", "100K")
    assert code == 0, err
    assert "written to" in out and "lineage recorded as" in out
    _assert_same_bits(_load(out_dir), _load(tiny_family["ft1"]))       # the exact delta gives the fine-tune back
    assert len(glob.glob(os.path.join(out_dir, "model-*-of-*.safetensors"))) > 1
    assert os.path.exists(os.path.join(out_dir, "config.json"))
    store = Store(root)
    new = [a for a in store.list() if a.id not in before]
    assert [a.kind for a in new] == ["export"]                           # no checkpoint: the tensors went once, to DIR
    record = store.get("again")
    assert record.id == new[0].id and not record.manifest.tensors
    assert record.manifest.info["output"] == os.path.abspath(out_dir)
    assert {n: t[2] for n, t in record.manifest.info["tensors"].items()} == store.get("d").manifest.checksums()
    assert record.manifest.info["apply"]["diff"] == store.get("d").id
    assert record.manifest.info["apply"]["onto"] == store.get("base").id
    assert {p["role"] for p in record.manifest.parents} == {"diff", "onto"}
    assert not glob.glob(str(tmp_path / ".ft-again.tsllm-partial-*"))
    code, out, err = cli("--store", root, "show", "again")              # a tensorless record says so, no ratio
    assert code == 0, err
    assert "a record without tensors" in out and "x its tensors" not in out and "x smaller" not in out
    assert f"output    {os.path.abspath(out_dir)}" in out
    # log --family shows the apply under its base
    code, out, err = cli("--store", root, "log", "--family", "base")
    assert code == 0, err
    assert f"apply of {store.get('d').id[:12]}" in out and record.id[:12] in out


def test_apply_keep_artifact_writes_checkpoint_and_dir(tmp_path, cli, tiny_family):
    root = _store_with_diff(cli, tmp_path, tiny_family)
    out_dir = str(tmp_path / "ft-again")
    code, _, err = cli("--store", root, "apply", "d", "--onto", "base", "-o", out_dir, "--keep-artifact",
                         "--name", "again")
    assert code == 0, err
    store = Store(root)
    kept = store.get("again")
    assert kept.kind == "checkpoint" and kept.manifest.checksums() == store.get("d").manifest.checksums()
    _assert_same_bits(_load(out_dir), _load(tiny_family["ft1"]))
    code, _, err = cli("--store", root, "apply", "d", "--onto", "base", "--keep-artifact")
    assert code == 2 and "--keep-artifact" in err                      # a usage error without -o


def test_apply_into_dir_failing_half_way_leaves_nothing(tmp_path, cli, tiny_family):
    """A coded block of the diff's last delta tensor is damaged: the tensors before it are already
    staged when the rebuilt block fails its checksum. Exit 5 (IntegrityError), and no directory,
    no staging beside it, no export record."""
    root = _store_with_diff(cli, tmp_path, tiny_family)
    store = Store(root)
    diff = store.get("d")
    entries = diff.manifest.info["delta"]["tensors"]
    last = [n for n in diff.manifest.metas() if entries[n]["mode"] == "delta"][-1]   # apply writes in this order
    block = os.path.join(diff.path, "deltas", last, "0")
    data = bytearray(open(block, "rb").read())
    os.chmod(block, 0o644)
    os.remove(block)                       # a stored block may be a hard link shared in the store: replace, not edit
    data[len(data) // 2] ^= 0x5A
    with open(block, "wb") as f:
        f.write(bytes(data))
    before = {a.id for a in store.list()}
    out_dir = str(tmp_path / "ft-again")
    code, _, err = cli("--store", root, "apply", "d", "--onto", "base", "-o", out_dir, "--name", "again")
    assert code == 5, err
    assert last in err
    assert not os.path.exists(out_dir)
    assert not glob.glob(str(tmp_path / ".ft-again.tsllm-partial-*"))
    store = Store(root)
    assert {a.id for a in store.list()} == before and not store.has("again")


def test_apply_budget_below_one_rebuild_is_refused_before_anything_is_written(tmp_path, cli, tiny_family):
    """A budget that cannot hold one row and one delta block's rebuild: exit 7 naming a tensor and
    the bytes it needs, with no directory, staging or record made."""
    root = _store_with_diff(cli, tmp_path, tiny_family)
    before = {a.id for a in Store(root).list()}
    out_dir = str(tmp_path / "ft-again")
    code, _, err = cli("--store", root, "apply", "d", "--onto", "base", "-o", out_dir, "--max-memory", "8K")
    assert code == 7, err
    assert "decode buffers of its delta-stored inputs" in err and "give --max-memory" in err
    assert not os.path.exists(out_dir) and not glob.glob(str(tmp_path / ".ft-again.tsllm-partial-*"))
    assert {a.id for a in Store(root).list()} == before
