"""kill -9 at a random point: nothing valid appears, and the re-run resumes to the same bits."""
import os

from tensorstore_llm.store import Store

from conftest import kill_after_journal_lines, run_tsllm


def test_kill_during_import_then_resume(tmp_path, small_family):
    root = str(tmp_path / "store")
    args = ["--store", root, "import", small_family["base"], "--name", "base", "--max-memory", "256K"]
    kill_after_journal_lines(args, root, lines=4)
    assert Store(root).list() == []
    assert "no artifacts" in run_tsllm("--store", root, "ls").stdout
    rerun = run_tsllm(*args)
    assert rerun.returncode == 0, rerun.stderr
    skipped = int(rerun.stdout.split("resumed: ")[1].split()[0])
    assert 4 <= skipped < 39
    clean_root = str(tmp_path / "clean")
    assert run_tsllm("--store", clean_root, "import", small_family["base"]).returncode == 0
    assert Store(root).get("base").id == Store(clean_root).list()[0].id  # bit-identical content
    assert run_tsllm("--store", root, "verify", "base").returncode == 0
    assert os.listdir(os.path.join(root, "staging")) == []


def test_kill_during_streamed_job_then_resume_bit_identical(tmp_path, small_family):
    root = str(tmp_path / "store")
    refs = [small_family[k] for k in ("base", "ft1", "ft2")]
    args = ["--store", root, "weighted-sum", *refs, "--weights", "0.2,0.3,0.5", "--name", "soup", "--max-memory", "512K"]
    kill_after_journal_lines(args, root, lines=6)
    assert Store(root).list() == []
    rerun = run_tsllm(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert int(rerun.stdout.split("resumed: ")[1].split()[0]) >= 6
    other = str(tmp_path / "other")
    done = run_tsllm("--store", other, "weighted-sum", *refs, "--weights", "0.2,0.3,0.5", "--max-memory", "4G")
    assert done.returncode == 0, done.stderr
    resumed, uninterrupted = Store(root).get("soup"), Store(other).list()[0]
    assert resumed.manifest.tensors == uninterrupted.manifest.tensors
    assert resumed.id == uninterrupted.id


def test_kill_during_ties_merge_then_resume_bit_identical(tmp_path, small_family):
    """A merge whose tensors need statistics passes resumes to the same bits as a clean run."""
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {small_family['base']}\nmodels:\n"
                      f"  - model: {small_family['ft1']}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
                      f"  - model: {small_family['ft2']}\n    parameters: {{weight: [0.2, 0.9], density: 0.6}}\n")
    root = str(tmp_path / "store")
    args = ["--store", root, "merge", recipe, "--name", "m", "--max-memory", "512K"]
    kill_after_journal_lines(args, root, lines=5)
    assert Store(root).list() == []
    rerun = run_tsllm(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert int(rerun.stdout.split("resumed: ")[1].split()[0]) >= 5
    clean = str(tmp_path / "clean")
    assert run_tsllm("--store", clean, "merge", recipe, "--max-memory", "8G").returncode == 0
    assert Store(root).get("m").id == Store(clean).list()[0].id
