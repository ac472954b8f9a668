"""Delta-stored checkpoints: bit-exact reconstruction, integrity of the parent binding, resume, dedup."""
import glob
import json
import os
import shutil

import pytest
import torch
from conftest import kill_after_journal_lines
from safetensors.torch import load_file, save_file

from tensorstore_llm.errors import IntegrityError
from tensorstore_llm.store import Store
from tensorstore_llm.store.dedup import footprint, stored_bytes
from tensorstore_llm.testing.synth import write_model_family


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _load_dir(path):
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def _assert_same_bits(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(_bits(got[k]), _bits(want[k])), k


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_delta_reconstructs_finetune_bit_for_bit(tmp_path, cli, dtype):
    base, ft1 = write_model_family(str(tmp_path / "fam"), "tiny", finetunes=1, dtype=dtype)
    root = str(tmp_path / "store")
    assert cli("--store", root, "import", base, "--name", "base")[0] == 0
    code, out, err = cli("--store", root, "import", ft1, "--delta-of", "base", "--name", "ft")
    assert code == 0, err
    store = Store(root)
    art = store.get("ft")
    assert art.manifest.info["base"]["id"] == store.get("base").id
    assert art.manifest.info["delta"]["depth"] == 1
    want = _load_dir(ft1)
    with store.open("ft") as src:            # whole tensors and row slices
        _assert_same_bits({k: src.read(k) for k in src.keys()}, want)
        emb = "model.embed_tokens.weight"
        assert torch.equal(_bits(src.read_rows(emb, 5, 77)), _bits(want[emb][5:77]))
    with store.open("ft") as src:            # the read-ahead hints (off by default) change nothing read
        src.prefetch = True
        _assert_same_bits({k: src.read(k) for k in src.keys()}, want)
    for budget in ("4M", "16M"):           # export at two budgets (that hold the decode buffers): the same bits
        out_dir = str(tmp_path / f"out-{budget}")
        code, _, err = cli("--store", root, "export", "ft", out_dir, "--max-memory", budget)
        assert code == 0, err
        _assert_same_bits(_load_dir(out_dir), want)
    assert cli("--store", root, "verify", "ft")[0] == 0
    # stored bytes < logical, and ls / show say so (its own size: every file, shared with the base or not)
    own = footprint(art).disk
    assert own < art.manifest.nbytes
    rows = json.loads(cli("--store", root, "ls", "--json")[1])
    assert {r["id"]: r["stored_bytes"] for r in rows}[art.id] == own
    show = cli("--store", root, "show", "ft")[1]
    assert "stored" in show and "delta     of" in show


def test_chain_of_three_and_depth_rule(tmp_path, cli, small_family):
    root = str(tmp_path / "store")
    fam = write_model_family(str(tmp_path / "fam"), "tiny", finetunes=3)
    assert cli("--store", root, "import", fam[0], "--name", "c0")[0] == 0
    for k in (1, 2, 3):
        code, out, err = cli("--store", root, "import", fam[k], "--delta-of", f"c{k - 1}", "--name", f"c{k}",
                             "--max-chain", "2", "--max-memory", "256K")
        assert code == 0, err
    store = Store(root)
    depths = [store.get(f"c{k}").manifest.info.get("delta", {}).get("depth", 0) for k in range(4)]
    assert depths == [0, 1, 2, 0]          # the third link would be 3 deep: a full snapshot
    assert cli("--store", root, "import", fam[3], "--delta-of", "c2", "--name", "c3d", "--max-chain", "3")[0] == 0
    assert store.get("c3d").manifest.info["delta"]["depth"] == 3
    for ref, k in (("c1", 1), ("c2", 2), ("c3", 3), ("c3d", 3)):
        with store.open(ref) as src:
            _assert_same_bits({n: src.read(n) for n in src.keys()}, _load_dir(fam[k]))
    assert store.get("c3").id == store.get("c3d").id or store.get("c3").manifest.checksums() == \
        store.get("c3d").manifest.checksums()


def test_corrupted_or_missing_parent_is_detected(tmp_path, cli, tiny_family):
    root = str(tmp_path / "store")
    assert cli("--store", root, "import", tiny_family["base"], "--name", "base")[0] == 0
    assert cli("--store", root, "import", tiny_family["ft1"], "--delta-of", "base", "--name", "ft")[0] == 0
    store = Store(root)
    parent = store.get("base")
    emb = "model.embed_tokens.weight"
    chunk = os.path.join(parent.path, "tensors", emb, "c", "0", "0")
    data = bytearray(open(chunk, "rb").read())
    data[100] ^= 0x40
    with open(chunk, "r+b") as f:           # in place: the bytes every link sees
        f.write(data)
    with store.open("ft") as src:
        with pytest.raises(IntegrityError):
            src.read(emb)
        src.read("model.norm.weight")        # other tensors still read
    code, _, err = cli("--store", root, "verify", "ft")
    assert code == IntegrityError.exit_code and emb in err
    code, _, err = cli("--store", root, "export", "ft", str(tmp_path / "out"))
    assert code == IntegrityError.exit_code and not os.path.exists(tmp_path / "out")
    # a coded block of the child damaged: caught too
    child = store.get("ft")
    block = os.path.join(child.path, "deltas", "model.layers.0.mlp.up_proj.weight", "0")
    raw = bytearray(open(block, "rb").read())
    raw[-3] ^= 0xFF
    with open(block, "wb") as f:
        f.write(raw)
    with store.open("ft") as src, pytest.raises(IntegrityError):
        src.read("model.layers.0.mlp.up_proj.weight")
    # the parent gone: the child cannot be opened
    shutil.rmtree(parent.path)
    with pytest.raises(IntegrityError, match="no longer holds"):
        store.open("ft")


def test_kill_while_storing_delta_then_rerun_is_bit_identical(tmp_path, cli, small_family):
    root = str(tmp_path / "store")
    assert cli("--store", root, "import", small_family["base"], "--name", "base")[0] == 0
    args = ["--store", root, "import", small_family["ft1"], "--delta-of", "base", "--name", "ft", "--max-memory", "1M"]
    kill_after_journal_lines(args, root, lines=5, journal="deltas.jsonl")
    store = Store(root)
    assert [a.kind for a in store.list()] == ["checkpoint"]      # nothing half-written appeared
    staged = glob.glob(os.path.join(root, "staging", "*", "deltas.jsonl"))
    assert staged and open(staged[0], "rb").read().count(b"\n") >= 5
    code, out, err = cli(*args)
    assert code == 0, err
    assert int(out.split("resumed: ")[1].split()[0]) >= 5
    other = str(tmp_path / "clean")
    assert cli("--store", other, "import", small_family["base"], "--name", "base")[0] == 0
    code, out, err = cli("--store", other, "import", small_family["ft1"], "--delta-of", "base", "--max-memory", "1M")
    assert code == 0, err
    resumed, uninterrupted = store.get("ft"), [a for a in Store(other).list() if a.manifest.info.get("delta")][0]
    assert resumed.id == uninterrupted.id
    for name, entry in resumed.manifest.info["delta"]["tensors"].items():
        for index in range(len(entry["blocks"])):
            a = open(os.path.join(resumed.path, "deltas", name, str(index)), "rb").read()
            b = open(os.path.join(uninterrupted.path, "deltas", name, str(index)), "rb").read()
            assert a == b
    assert os.listdir(os.path.join(root, "staging")) == []


def test_identical_tensors_are_stored_once(tmp_path, cli, tiny_family):
    root = str(tmp_path / "store")
    copy = str(tmp_path / "elsewhere" / "base")
    shutil.copytree(tiny_family["base"], copy)
    assert cli("--store", root, "import", tiny_family["base"], "--name", "a")[0] == 0
    assert cli("--store", root, "import", copy, "--name", "b")[0] == 0     # same weights, another path
    store = Store(root)
    a, b = store.get("a"), store.get("b")
    assert a.id != b.id
    emb = "model.embed_tokens.weight"
    chunk_a = os.path.join(a.path, "tensors", emb, "c", "0", "0")
    chunk_b = os.path.join(b.path, "tensors", emb, "c", "0", "0")
    assert os.stat(chunk_a).st_ino == os.stat(chunk_b).st_ino
    own_a, shared_a = stored_bytes(a)
    own_b, _ = stored_bytes(b)
    assert shared_a >= a.manifest.nbytes and own_a + own_b < 1.2 * a.manifest.nbytes
    # a fine-tune with a frozen layer, imported whole, shares that layer with the base
    frozen = "model.layers.0.mlp.up_proj.weight"
    tensors = _load_dir(tiny_family["ft1"])
    tensors[frozen] = _load_dir(tiny_family["base"])[frozen]
    save_file(tensors, str(tmp_path / "frozen.safetensors"))
    assert cli("--store", root, "import", str(tmp_path / "frozen.safetensors"), "--name", "ft")[0] == 0
    ft = store.get("ft")
    up = os.path.join(ft.path, "tensors", frozen, "c", "0", "0")
    assert os.stat(up).st_ino == os.stat(os.path.join(a.path, "tensors", frozen, "c", "0", "0")).st_ino
    emb_ft = os.path.join(ft.path, "tensors", emb, "c", "0", "0")
    assert os.stat(emb_ft).st_nlink == 2      # changed tensors: its own copy (and the object's link)
    for ref in ("a", "b", "ft"):
        assert cli("--store", root, "verify", ref)[0] == 0
    assert cli("--store", root, "gc")[0] == 0          # objects in use are kept
    assert store.verify("b") and os.path.isdir(os.path.join(root, "objects"))
    for art in (a, b, ft):                             # nothing links them any more: gc removes them
        shutil.rmtree(art.path)
    removed = store.gc()
    assert any("objects" in p for p in removed)
    assert not any(os.listdir(os.path.join(root, "objects", d)) for d in os.listdir(os.path.join(root, "objects")))


def test_lossy_diff_reads_back_its_recorded_reconstruction(tmp_path, cli, tiny_family):
    root = str(tmp_path / "store")
    assert cli("--store", root, "import", tiny_family["base"], "--name", "base")[0] == 0
    code, out, err = cli("--store", root, "diff", tiny_family["ft1"], "--base", "base", "--codec", "low-rank",
                         "--param", "rank=4", "--name", "d")
    assert code == 0, err
    store = Store(root)
    from tensorstore_llm.diff.codecs import get_codec

    codec = get_codec("low-rank", rank=4)
    base, ft = _load_dir(tiny_family["base"]), _load_dir(tiny_family["ft1"])
    with store.open("d") as src:
        for k in ft:
            want = codec.decode(base[k], codec.encode(base[k], ft[k], tensor=k), tensor=k)
            assert torch.equal(_bits(src.read(k)), _bits(want)), k
    assert cli("--store", root, "verify", "d")[0] == 0


def test_real_smollm2_finetune_as_delta(tmp_path, cli):
    from tensorstore_llm.errors import FormatError
    from tensorstore_llm.testing.finetune import smollm2_finetune
    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    try:
        base = smollm2_checkpoint("bfloat16")
        ft = smollm2_finetune(steps=3, seq_len=32, batch=2)   # a real fine-tune: 3 AdamW steps, cached
    except FormatError as e:
        pytest.skip(str(e))
    root = str(tmp_path / "store")
    assert cli("--store", root, "import", base, "--name", "base")[0] == 0
    code, out, err = cli("--store", root, "import", ft, "--delta-of", "base", "--name", "ft")
    assert code == 0, err
    store = Store(root)
    art = store.get("ft")
    assert stored_bytes(art)[0] * 2 < art.manifest.nbytes
    want = _load_dir(ft)
    with store.open("ft") as src:
        _assert_same_bits({k: src.read(k) for k in src.keys()}, want)


def test_engine_reads_delta_artifacts_as_inputs(tmp_path, cli, tiny_family):
    """A merge takes a delta-stored fine-tune like any checkpoint: 1*ft + 0*base == ft exactly."""
    root = str(tmp_path / "store")
    assert cli("--store", root, "import", tiny_family["base"], "--name", "base")[0] == 0
    assert cli("--store", root, "import", tiny_family["ft1"], "--delta-of", "base", "--name", "ft")[0] == 0
    code, out, err = cli("--store", root, "weighted-sum", "ft", "base", "--weights", "1,0", "--name", "same",
                         "--max-memory", "2M")   # holds the delta input's decode buffers (budget.whole_bytes)
    assert code == 0, err
    store = Store(root)
    assert store.get("same").manifest.checksums() == store.get("ft").manifest.checksums()
    with store.open("ft") as src:
        # (DECODE_WORKERS + 1) blocks in flight and the block read ahead, 6 block-sized buffers each
        assert 0 < src.extra_read_bytes("model.embed_tokens.weight") <= 24 * 64 * 512 * 2


def test_the_same_delta_stored_twice_takes_its_bytes_once(tmp_path, cli, tiny_family):
    root = str(tmp_path / "store")
    assert cli("--store", root, "import", tiny_family["base"], "--name", "base")[0] == 0
    assert cli("--store", root, "import", tiny_family["ft1"], "--delta-of", "base", "--name", "ft")[0] == 0
    assert cli("--store", root, "diff", tiny_family["ft1"], "--base", "base", "--name", "d")[0] == 0
    store = Store(root)
    ft, d = store.get("ft"), store.get("d")
    assert ft.id != d.id
    block = os.path.join("deltas", "model.embed_tokens.weight", "0")
    assert os.stat(os.path.join(ft.path, block)).st_ino == os.stat(os.path.join(d.path, block)).st_ino
    assert stored_bytes(ft)[1] > 0
    shutil.rmtree(ft.path)                  # one gone: gc keeps what the other links
    store.gc()
    with store.open("d") as src:
        _assert_same_bits({k: src.read(k) for k in src.keys()}, _load_dir(tiny_family["ft1"]))
    assert cli("--store", root, "verify", "d")[0] == 0
