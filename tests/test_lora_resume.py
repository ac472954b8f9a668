"""`tsllm lora extract` from a diff artifact or a delta-stored checkpoint (the base is the diff's
parent; the adapter equals the one extracted from the fine-tune and its base), and kill -9 of
`lora extract`, `lora combine` and `lora init`: the re-run resumes and gives the same artifact,
bit for bit, as an uninterrupted run."""
from __future__ import annotations

import glob
import os

from tensorstore_llm.store import Store

from conftest import kill_after_journal_lines, run_tsllm


def _import_base(cli, root, base_dir):
    code, _, err = cli("-q", "--store", root, "import", base_dir, "--name", "b0")
    assert code == 0, err


def _staging(root):
    return [p for p in glob.glob(os.path.join(root, "staging", "*")) if os.path.isdir(p)]


def test_extract_from_a_diff_equals_extract_from_the_finetune(tmp_path, cli, tiny_family):
    s = str(tmp_path / "store")
    assert cli("-q", "--store", s, "import", tiny_family["base"], "--name", "b0")[0] == 0
    assert cli("-q", "--store", s, "import", tiny_family["ft2"], "--name", "other")[0] == 0
    code, _, err = cli("-q", "--store", s, "diff", tiny_family["ft1"], "--base", "b0", "--name", "d1")
    assert code == 0, err
    code, _, err = cli("-q", "--store", s, "import", tiny_family["ft1"], "--delta-of", "b0", "--name", "ft1d")
    assert code == 0, err
    store = Store(s)
    assert store.get("d1").kind == "diff" and store.get("ft1d").manifest.info.get("delta")
    code, out, err = cli("--store", s, "lora", "extract", tiny_family["ft1"], "--base", "b0", "--rank", "4",
                         "--name", "direct", "--seed", "3")
    assert code == 0, err
    for ref in ("d1", "ft1d"):        # no --base: the parent is the base
        code, out, err = cli("--store", s, "lora", "extract", ref, "--rank", "4", "--name", f"from-{ref}", "--seed",
                             "3")
        assert code == 0, err
        assert "captured energy" in out
    direct = store.get("direct")
    for ref in ("from-d1", "from-ft1d"):
        art = store.get(ref)
        assert art.manifest.tensors == direct.manifest.tensors            # the same factors, bit for bit
        assert art.manifest.info == direct.manifest.info                  # bound to b0 by the same checksums
        assert art.manifest.info["base"]["id"] == store.get("b0").id
    assert [p["role"] for p in store.get("from-d1").manifest.parents] == ["base", "diff"]
    assert store.get("from-d1").manifest.parents[1]["id"] == store.get("d1").id
    # --base given and equal to the parent: the same adapter
    assert cli("-q", "--store", s, "lora", "extract", "d1", "--base", "b0", "--rank", "4", "--seed", "3",
               "--name", "with-base")[0] == 0
    assert store.get("with-base").manifest.tensors == direct.manifest.tensors
    # a directory with the parent's bytes is the parent (by the checksums the diff was stored against)
    code, _, err = cli("-q", "--store", s, "lora", "extract", "d1", "--base", tiny_family["base"], "--rank", "4",
                       "--seed", "3", "--name", "dir-base")
    assert code == 0, err
    assert store.get("dir-base").manifest.tensors == direct.manifest.tensors
    # a delta-stored checkpoint is a whole model: it may be compared with another base
    code, _, err = cli("-q", "--store", s, "lora", "extract", "ft1d", "--base", "other", "--rank", "4", "--name",
                       "vs-other")
    assert code == 0, err
    assert store.get("vs-other").manifest.info["base"]["id"] == store.get("other").id
    # a diff whose parent is not --base is refused, and nothing is written
    count = len(store.list())
    code, _, err = cli("--store", s, "lora", "extract", "d1", "--base", "other", "--rank", "4")
    assert code == 6 and "diff" in err and store.get("b0").id[:12] in err and "differs" in err, err
    code, _, err = cli("--store", s, "lora", "extract", "d1", "--base", tiny_family["ft2"], "--rank", "4")
    assert code == 6 and "differs" in err, err
    # a plain fine-tune without --base
    code, _, err = cli("--store", s, "lora", "extract", tiny_family["ft1"], "--rank", "4")
    assert code == 7 and "--base" in err, err
    assert len(store.list()) == count and _staging(s) == []


def _resumed(stdout: str) -> int:
    return int(stdout.split("resumed: ")[1].split()[0])


def test_kill_during_extract_then_resume_bit_identical(tmp_path, cli, small_family):
    root, clean = str(tmp_path / "store"), str(tmp_path / "clean")
    for r in (root, clean):
        _import_base(cli, r, small_family["base"])
    args = ["--store", root, "lora", "extract", small_family["ft1"], "--base", "b0", "--rank", "8", "--name", "ex",
            "--max-memory", "4M"]
    kill_after_journal_lines(args, root, lines=6)
    assert [a.kind for a in Store(root).list()] == ["checkpoint"]      # nothing half-written appeared
    rerun = run_tsllm(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert _resumed(rerun.stdout) >= 6
    code, _, err = cli("--store", clean, "lora", "extract", small_family["ft1"], "--base", "b0", "--rank", "8")
    assert code == 0, err
    assert Store(root).get("ex").id == Store(clean).list(kind="lora")[0].id
    assert _staging(root) == []


def test_kill_during_combine_then_resume_bit_identical(tmp_path, cli, small_family):
    root, clean = str(tmp_path / "store"), str(tmp_path / "clean")
    for r in (root, clean):
        _import_base(cli, r, small_family["base"])
        for ft in ("ft1", "ft2"):
            code, _, err = cli("-q", "--store", r, "lora", "extract", small_family[ft], "--base", "b0", "--rank", "8",
                               "--name", ft)
            assert code == 0, err
    ties = ["lora", "combine", "ft1", "ft2", "--weights", "0.7,0.5", "--method", "ties", "--density", "0.4",
            "--rank", "6", "--seed", "2"]
    linear = ["lora", "combine", "ft1", "ft2", "--weights", "0.7,0.5"]
    for verb, lines in ((ties, 6), (linear, 8)):
        args = ["--store", root, *verb, "--name", "c"]
        before = len(Store(root).list())
        kill_after_journal_lines(args, root, lines=lines)
        assert len(Store(root).list()) == before
        rerun = run_tsllm(*args)
        assert rerun.returncode == 0, rerun.stderr
        assert _resumed(rerun.stdout) >= lines
        code, out, err = cli("-q", "--store", clean, *verb)
        assert code == 0, err
        assert Store(root).get("c").id == out.split()[-1]
        assert _staging(root) == []


def test_kill_during_svd_init_then_resume_bit_identical(tmp_path, cli, small_family):
    root, clean = str(tmp_path / "store"), str(tmp_path / "clean")
    for r in (root, clean):
        _import_base(cli, r, small_family["base"])
    args = ["--store", root, "lora", "init", "b0", "--method", "goat", "--experts", "2", "--rank", "4",
            "--name", "g", "--max-memory", "4M"]
    kill_after_journal_lines(args, root, lines=6)
    assert [a.kind for a in Store(root).list()] == ["checkpoint"]
    rerun = run_tsllm(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert _resumed(rerun.stdout) >= 6
    code, out, err = cli("-q", "--store", clean, "lora", "init", "b0", "--method", "goat", "--experts", "2", "--rank",
                         "4")
    assert code == 0, err
    ids = out.split()
    store = Store(root)
    assert [store.get("g-residual").id, store.get("g-expert0").id, store.get("g-expert1").id] == ids
    assert _staging(root) == []
