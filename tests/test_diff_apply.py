"""tsllm apply: onto its own base (the fine-tune, bit for bit), onto another release (transfer)."""
import glob
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tensorstore_llm.errors import BaseMismatch
from tensorstore_llm.store import Store
from tensorstore_llm.testing.synth import write_model_family

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
EXTRA_ROWS = 24


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _load(path):
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors")) if os.path.isdir(path) else [path]):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def release_family(tmp_path_factory):
    """v1 base, v1 fine-tune (HF dirs) and a v2 base (.safetensors) with EXTRA_ROWS more vocabulary rows."""
    root = tmp_path_factory.mktemp("releases")
    base, ft = write_model_family(str(root / "v1"), "tiny", finetunes=1)
    gen = torch.Generator().manual_seed(7)
    v2 = {}
    for name, t in _load(base).items():
        moved = t.float() + 0.004 * torch.randn(t.shape, generator=gen)       # a new release of the base
        if name in (EMB, HEAD):
            moved = torch.cat([moved, 0.02 * torch.randn(EXTRA_ROWS, t.shape[1], generator=gen)])
        v2[name] = moved.to(t.dtype)
    v2_path = str(root / "v2.safetensors")
    save_file(v2, v2_path)
    return {"base": base, "ft": ft, "v2": v2_path}


@pytest.fixture
def loaded(tmp_path, cli, release_family):
    root = str(tmp_path / "store")
    for args in (("import", release_family["base"], "--name", "v1"),
                 ("diff", release_family["ft"], "--base", "v1", "--name", "d"),
                 ("import", release_family["v2"], "--name", "v2")):
        code, out, err = cli("--store", root, *args)
        assert code == 0, err
    return root


def test_apply_onto_own_base_is_the_finetune(tmp_path, cli, loaded, release_family):
    out_dir = str(tmp_path / "again")
    code, out, err = cli("--store", loaded, "apply", "d", "--onto", "v1", "--name", "ft-again", "-o", out_dir)
    assert code == 0, err
    want = _load(release_family["ft"])
    got = _load(out_dir)
    assert sorted(got) == sorted(want) and all(torch.equal(_bits(got[k]), _bits(want[k])) for k in want)
    store = Store(loaded)
    record = store.get("ft-again")          # -o writes once, into the directory; the store keeps the lineage
    assert record.kind == "export" and not record.manifest.tensors
    assert {n: t[2] for n, t in record.manifest.info["tensors"].items()} == store.get("d").manifest.checksums()
    assert record.manifest.recipe["op"] == "apply" and record.manifest.info["apply"]["diff"] == store.get("d").id


def test_same_weights_under_another_id_count_as_own_base(tmp_path, cli, loaded, release_family):
    copy = str(tmp_path / "copy-of-v1")
    shutil.copytree(release_family["base"], copy)
    assert cli("--store", loaded, "import", copy, "--name", "v1-copy")[0] == 0
    store = Store(loaded)
    assert store.get("v1-copy").id != store.get("v1").id
    code, out, err = cli("--store", loaded, "apply", "d", "--onto", "v1-copy", "--name", "x")
    assert code == 0, err
    assert store.get("x").manifest.checksums() == store.get("d").manifest.checksums()


def test_wrong_base_without_transfer_fails_before_any_work(cli, loaded):
    store = Store(loaded)
    before = sorted(a.id for a in store.list())
    code, out, err = cli("--store", loaded, "apply", "d", "--onto", "v2", "--name", "nope")
    assert code == BaseMismatch.exit_code
    assert "--transfer" in err and store.get("v1").short_id in err
    assert sorted(a.id for a in store.list()) == before
    assert os.listdir(os.path.join(loaded, "staging")) == []      # nothing was even staged
    assert not store.has("nope")


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_transfer_onto_next_release_with_vocabulary_growth(cli, loaded, release_family, alpha):
    code, out, err = cli("--store", loaded, "apply", "d", "--onto", "v2", "--transfer", "--alpha", alpha,
                         "--name", "ft-v2", "--max-memory", "256K")
    assert code == 0, err
    assert f"grown: {EMB}" in out and f"grown: {HEAD}" in out
    base, ft, v2 = _load(release_family["base"]), _load(release_family["ft"]), _load(release_family["v2"])
    store = Store(loaded)
    art = store.get("ft-v2")
    with store.open("ft-v2") as src:
        for name, new in v2.items():
            old_rows = base[name].shape[0] if base[name].dim() else 1
            want = new.float().clone()
            if base[name].dim():
                want[:old_rows] = new[:old_rows].float() + alpha * (ft[name].float() - base[name].float())
            else:
                want = new.float() + alpha * (ft[name].float() - base[name].float())
            want = want.to(new.dtype)
            assert torch.equal(_bits(src.read(name)), _bits(want)), name
            if name in (EMB, HEAD):      # the new rows are the new base's, untouched
                assert torch.equal(_bits(src.read_rows(name, old_rows, new.shape[0])), _bits(new[old_rows:]))
    assert art.manifest.recipe == {"op": "transfer", "alpha": alpha, "from_base": store.get("v1").id}
    assert {p["role"]: p["id"] for p in art.manifest.parents} == {"diff": store.get("d").id, "onto": store.get("v2").id}
    assert art.manifest.info["transfer"]["grown"] == {EMB: [512, 512 + EXTRA_ROWS], HEAD: [512, 512 + EXTRA_ROWS]}
    family = cli("--store", loaded, "log", "--family", "v1")[1]
    assert family.count("release ") == 2 and "transfer of" in family and "[ft-v2]" in family


def test_transfer_refuses_other_shape_changes(tmp_path, cli, loaded, release_family):
    v2 = _load(release_family["v2"])
    v2["model.layers.0.mlp.up_proj.weight"] = v2["model.layers.0.mlp.up_proj.weight"][:, :32].contiguous()
    path = str(tmp_path / "v3.safetensors")
    save_file(v2, path)
    assert cli("--store", loaded, "import", path, "--name", "v3")[0] == 0
    code, out, err = cli("--store", loaded, "apply", "d", "--onto", "v3", "--transfer")
    assert code == 6 and "model.layers.0.mlp.up_proj.weight" in err
    assert os.listdir(os.path.join(loaded, "staging")) == []


def test_transfer_refuses_tensors_the_finetune_reshaped(tmp_path, cli, loaded, release_family):
    ft = _load(release_family["ft"])
    ft[EMB] = torch.cat([ft[EMB], ft[EMB][:4]])        # the fine-tune added 4 tokens of its own
    path = str(tmp_path / "ft-grown.safetensors")
    save_file(ft, path)
    code, out, err = cli("--store", loaded, "diff", path, "--base", "v1", "--name", "dg")
    assert code == 0, err
    assert Store(loaded).get("dg").manifest.info["delta"]["tensors"][EMB]["mode"] == "raw"
    code, out, err = cli("--store", loaded, "apply", "dg", "--onto", "v2", "--transfer")
    assert code == 6 and EMB in err and "no (ft - base)" in err
    code, out, err = cli("--store", loaded, "apply", "dg", "--onto", "v1", "--name", "back")   # own base: a copy
    assert code == 0, err
    with Store(loaded).open("back") as src:
        assert torch.equal(_bits(src.read(EMB)), _bits(ft[EMB]))
