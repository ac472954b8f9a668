"""`tsllm logits precompute / show` end to end on a tiny slice, and CLI errors."""
import json
import os

import pytest

CORPUS = os.path.join(os.path.dirname(__file__), "..", "data", "corpus", "literature.txt")


@pytest.fixture(scope="module")
def teacher_dir():
    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    return smollm2_checkpoint()


def test_precompute_then_show(cli, teacher_dir, tmp_path):
    import torch

    from tensorstore_llm.distill.dataset import DistillDataset
    from tensorstore_llm.store import Store

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    store = str(tmp_path / "store")
    try:
        code, stdout, err = cli("--store", store, "logits", "precompute", "--teacher", teacher_dir, "--data", CORPUS,
                                "--name", "kd", "--seq-len", "16", "--max-sequences", "2", "--shard-sequences", "1",
                                "--draws", "20")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert "(kd): 2 sequences, 32 tokens" in stdout and "B/token" in stdout
    code, stdout, err = cli("--store", store, "logits", "show", "kd")
    assert code == 0, err
    assert "rs-kd N=20 tau=1.0 T=1.0" in stdout and "2 x 16 = 32 tokens in 2 shard(s)" in stdout
    code, stdout, err = cli("--store", store, "logits", "show", "kd", "--json")
    shown = json.loads(stdout)
    assert shown["info"]["sampling"]["draws"] == 20 and shown["stats"]["tokens"] == 32
    assert 1 <= shown["stats"]["unique_per_position"] <= 20
    items = list(DistillDataset("kd", store=Store(store), shuffle=False))
    assert len(items) == 2 and items[0]["input_ids"].shape == (16,)
    code, stdout, _ = cli("--store", store, "ls")
    assert code == 0 and "logits" in stdout


def test_cli_errors(cli, teacher_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    code, _, err = cli("logits", "precompute", "--teacher", teacher_dir, "--data", str(empty), "--out",
                       str(tmp_path / "o"))
    assert code == 7 and err.startswith("error:") and "empty" in err
    code, _, err = cli("logits", "precompute", "--teacher", teacher_dir, "--data", CORPUS, "--out", str(tmp_path / "o"),
                       "--seq-len", "100000")
    assert code == 7 and "fewer than one sequence of seq_len=100000" in err
    code, _, err = cli("logits", "precompute", "--teacher", teacher_dir, "--data", CORPUS, "--address", "host:6379")
    assert code == 2 and "--address and --ray-actors need --engine ray" in err
    code, _, err = cli("logits", "show", str(tmp_path))
    assert code == 4 and "not a committed dataset" in err
    code, _, err = cli("--store", str(tmp_path / "store"), "logits", "show", "nothing-here")
    assert code == 3 and "no artifact or tag named 'nothing-here'" in err


def test_store_artifact_teacher_is_exported_to_scratch_and_removed(cli, teacher_dir, tmp_path, monkeypatch):
    """A teacher given as a store artifact is recorded by its id; its temporary export is gone afterwards."""
    import tempfile

    import torch

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    store = str(tmp_path / "store")
    code, _, err = cli("--store", store, "import", teacher_dir, "--name", "teacher")
    assert code == 0, err
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, stdout, err = cli("--store", store, "-q", "logits", "precompute", "--teacher", "teacher", "--data",
                                CORPUS, "--seq-len", "16", "--max-sequences", "1", "--draws", "10")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    code, shown, err = cli("--store", store, "logits", "show", stdout.strip(), "--json")
    assert code == 0, err
    code, teacher_id, _ = cli("--store", store, "-q", "show", "teacher", "--json")
    assert json.loads(shown)["info"]["teacher_source"].startswith("artifact ")
    assert json.loads(shown)["info"]["teacher_source"].split()[1] in teacher_id
    assert [p.name for p in scratch.iterdir() if p.name.startswith("tsllm-teacher-")] == []
