"""Carried files (config, tokenizer) are stored once across the store, like tensors and coded blocks:
a fine-tune stored as a delta of its base links the base's identical files instead of copying them."""
import os

from tensorstore_llm.store import Store
from tensorstore_llm.store.dedup import footprint


def test_delta_artifact_links_the_base_carried_files(tmp_path, cli, tiny_family):
    root = str(tmp_path / "store")
    for args in (("import", tiny_family["base"], "--name", "base"),
                 ("import", tiny_family["ft1"], "--delta-of", "base", "--name", "ft")):
        code, _, err = cli("--store", root, *args)
        assert code == 0, err
    store = Store(root)
    base, ft = store.get("base"), store.get("ft")
    same = [n for n in ft.manifest.files if base.manifest.files.get(n) == ft.manifest.files[n]]
    assert same and "config.json" in same
    for name in same:
        a, b = (os.stat(os.path.join(x.path, "files", name)) for x in (base, ft))
        assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino), name
    fp = footprint(ft)
    assert fp.shared >= sum(os.path.getsize(os.path.join(ft.path, "files", n)) for n in same)
    code, _, err = cli("--store", root, "verify", "ft")
    assert code == 0, err
    # removing the base's directory leaves the delta's copy of each file intact (a link, not a move)
    with open(os.path.join(ft.path, "files", "config.json"), "rb") as f:
        before = f.read()
    store.gc()
    with open(os.path.join(ft.path, "files", "config.json"), "rb") as f:
        assert f.read() == before
