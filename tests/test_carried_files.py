"""Carried files (config, tokenizer, ...) travel whatever their size, or fail with their name."""
import hashlib
import json
import os
import shutil

from tensorstore_llm.io.hf_dir import MAX_CARRIED_FILE_BYTES
from tensorstore_llm.store import Store

from conftest import run_tsllm


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def test_65_mib_tokenizer_is_carried_through_import_and_export(tmp_path, tiny_family):
    model = tmp_path / "model"
    shutil.copytree(tiny_family["base"], model)
    tokenizer = model / "tokenizer.json"
    with open(tokenizer, "wb") as f:  # a large vocabulary's tokenizer: 65 MiB of real JSON
        f.write(b'{"model": {"type": "BPE", "merges": "')
        f.write(os.urandom(65 * 2**19).hex().encode())
        f.write(b'"}}')
    assert os.path.getsize(tokenizer) > 65 * 2**20 and json.loads(tokenizer.read_text())["model"]["type"] == "BPE"
    (model / "rust_model.ot").write_bytes(b"\0" * 64)  # weights of another framework are not carried
    root = tmp_path / "store"
    done = run_tsllm("--store", root, "import", model, "--name", "m")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    artifact = Store(str(root)).get("m")
    assert sorted(artifact.manifest.files) == ["config.json", "generation_config.json", "tokenizer.json"]
    assert run_tsllm("--store", root, "verify", "m").returncode == 0
    out = tmp_path / "out"
    done = run_tsllm("--store", root, "export", "m", out)
    assert done.returncode == 0, done.stderr
    assert _sha(out / "tokenizer.json") == _sha(tokenizer)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]


def test_carried_file_over_the_limit_is_an_error_naming_it(tmp_path, tiny_family, cli):
    model = tmp_path / "model"
    shutil.copytree(tiny_family["base"], model)
    with open(model / "tokenizer.json", "wb") as f:  # sparse: no gigabyte is written
        f.truncate(MAX_CARRIED_FILE_BYTES + 1)
    root = tmp_path / "store"
    for extra in ([], ["--dry-run"]):
        code, _out, err = cli("--store", root, "import", model, *extra)
        assert code == 4 and err.count("\n") == 1, err
        assert str(model / "tokenizer.json") in err and str(MAX_CARRIED_FILE_BYTES) in err, err
    assert not (root / "artifacts").exists() or os.listdir(root / "artifacts") == []
    os.remove(model / "tokenizer.json")
    assert cli("--store", root, "import", model)[0] == 0
