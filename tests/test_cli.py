"""The command line: help without torch, every documented error, and the quickstart."""
import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_tsllm


@pytest.mark.serial   # wall-time asserts: alone on the machine under pytest-xdist
def test_help_is_fast_and_does_not_import_torch():
    code = ("import sys, time; t = time.perf_counter(); from tensorstore_llm_cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported for --help'\n"
            "print(time.perf_counter() - t, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # 0.1-0.2 s on a quiet machine; the bound leaves room for a loaded CI host and still fails
    # if --help pays for importing torch or numba (1-2 s here)
    assert float(result.stderr.strip().splitlines()[-1]) < 1.0
    start = time.perf_counter()
    assert run_tsllm("--help").returncode == 0
    assert time.perf_counter() - start < 3.0  # whole interpreter start included
    for sub in ("import", "export", "convert", "weighted-sum", "gc"):
        assert "Usage: tsllm " + sub in run_tsllm(sub, "--help").stdout


def test_store_verbs(cli, tmp_path, tiny_family):
    s = str(tmp_path / "store")
    code, out, _err = cli("--store", s, "import", tiny_family["base"], "--name", "base")
    assert code == 0 and "tagged base" in out
    assert cli("--store", s, "import", tiny_family["ft1"], "--name", "ft1")[0] == 0
    code, out, _ = cli("--store", s, "ls")
    assert code == 0 and "base" in out and "ft1" in out and out.count("checkpoint") == 2
    rows = json.loads(cli("--store", s, "ls", "--json")[1])
    assert {r["tags"][0] for r in rows} == {"base", "ft1"}
    code, out, _ = cli("--store", s, "show", "base")
    assert code == 0 and "model.embed_tokens.weight" in out and "512x64" in out and "hf-dir" in out
    assert cli("--store", s, "weighted-sum", "base", "ft1", "--weights", "0.5,0.5", "--name", "soup")[0] == 0
    code, out, _ = cli("--store", s, "log", "soup")
    assert code == 0 and "weighted_sum" in out and "model: " in out and "[base]" in out and "<- hf-dir" in out
    code, out, _ = cli("--store", s, "tag", "soup", "best")
    assert code == 0 and "best ->" in out
    assert cli("--store", s, "tag", "base", "best")[0] == 3  # exists, no --force
    assert cli("--store", s, "tag", "-f", "base", "best")[0] == 0
    assert cli("--store", s, "tag", "-d", "best")[0] == 0
    assert cli("--store", s, "verify", "base", "soup")[0] == 0
    code, out, _ = cli("--store", s, "convert", "base", "--dtype", "fp16", "--dry-run", "--max-memory", "16K")
    assert code == 0 and "peak tensor memory" in out and "float16" in out
    code, out, _ = cli("--store", s, "export", "soup", str(tmp_path / "hf"))
    assert code == 0 and os.path.exists(tmp_path / "hf" / "model.safetensors")
    assert cli("--store", s, "gc")[1].startswith("removed 0")
    assert "copy" in cli("ops")[1] and "weighted_sum" in cli("ops")[1]


def _expect_error(cli, code, pattern, *args):
    got, out, err = cli(*args)
    assert got == code, (got, out, err)
    assert err.startswith("error: ") and pattern in err and len(err.strip().splitlines()) == 1, err
    return err


def test_documented_errors_and_exit_codes(cli, tmp_path, tiny_family):
    s = str(tmp_path / "store")
    _expect_error(cli, 3, "no artifact or tag named 'nothing'", "--store", s, "show", "nothing")
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "pytorch_model.bin").write_bytes(b"\x80\x04")
    _expect_error(cli, 4, "never unpickles", "--store", s, "import", str(pickles))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{nope")
    _expect_error(cli, 4, "bad.safetensors: header is not valid", "--store", s, "import", str(bad))
    trunc = tmp_path / "trunc.safetensors"
    save_file({"w": torch.zeros(100, 100)}, str(trunc))
    trunc.write_bytes(trunc.read_bytes()[:-10])
    _expect_error(cli, 4, "truncated", "--store", s, "import", str(trunc))
    evil = tmp_path / "evil.safetensors"
    body = json.dumps({"../../escape": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    evil.write_bytes(struct.pack("<Q", len(body)) + body + b"\0")
    _expect_error(cli, 6, "'../../escape' is not allowed", "--store", s, "import", str(evil))
    odd = tmp_path / "odd.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2, dtype=torch.bfloat16)}, str(odd))
    _expect_error(cli, 6, "model.embed_tokens.weight", "--store", s, "weighted-sum", tiny_family["base"], str(odd), "--weights", "1,1")
    _expect_error(cli, 6, "unknown dtype 'fp7'", "--store", s, "import", tiny_family["base"], "--dtype", "fp7")
    assert cli("--store", s, "ls")[1].startswith("no artifacts")
    assert cli("--store", s, "import", tiny_family["base"], "--name", "base")[0] == 0
    assert cli("--store", s, "convert", "base", "--dtype", "fp16", "--max-memory", "lots")[0] == 2  # usage error
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    (out_dir / "x").write_text("mine")
    _expect_error(cli, 8, "not an empty directory", "--store", s, "export", "base", str(out_dir))
    chunk = [c for c in glob.glob(os.path.join(s, "artifacts", "*", "tensors", "lm_head.weight", "c", "**"), recursive=True) if os.path.isfile(c)][0]
    data = bytearray(open(chunk, "rb").read())
    data[7] ^= 0xFF
    open(chunk, "wb").write(bytes(data))
    _expect_error(cli, 5, "lm_head.weight", "--store", s, "verify", "base")
    assert cli("--store", s, "weighted-sum", "base", "--weights", "x")[0] == 2  # usage error


def _unshare_available():
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_unshare = pytest.mark.skipif(not _unshare_available(), reason="needs `unshare -rm` with tmpfs mounts (user namespaces)")


def _in_small_fs(tmp_path, script):
    """Run a shell script in a private mount namespace where $FS is a 3 MiB tmpfs."""
    fs = tmp_path / "fs"
    fs.mkdir(exist_ok=True)
    full = f"set -u; FS={fs}; mount -t tmpfs -o size=3m tmpfs $FS; PY={sys.executable}; {script}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", full], capture_output=True, text=True)


@needs_unshare
def test_disk_full_gives_clean_error_and_no_artifact(tmp_path, small_family):
    result = _in_small_fs(tmp_path, f"""
        $PY -m tensorstore_llm_cli --store $FS/store import {small_family['base']}; echo "rc=$?"
        echo "artifacts=$(ls $FS/store/artifacts | wc -l) staging=$(ls $FS/store/staging | wc -l)" """)
    assert "rc=8" in result.stdout, result.stdout + result.stderr
    assert "no space left on the device" in result.stderr and result.stderr.count("\n") == 1
    assert "artifacts=0 staging=0" in result.stdout


@needs_unshare
def test_read_only_store_gives_clean_error(tmp_path, tiny_family):
    result = _in_small_fs(tmp_path, f"""
        $PY -m tensorstore_llm_cli -q --store $FS/store import {tiny_family['base']} --name base >/dev/null
        mount -o remount,ro $FS
        $PY -m tensorstore_llm_cli --store $FS/store convert base --dtype fp16; echo "rc=$?"
        $PY -m tensorstore_llm_cli --store $FS/store verify base; echo "rc=$?" """)
    assert "rc=8" in result.stdout and "read-only" in result.stderr, result.stdout + result.stderr
    assert result.stdout.strip().endswith("rc=0")  # reading a read-only store still works


def test_quickstart_end_to_end(tmp_path):
    result = run_tsllm("quickstart", "--workdir", str(tmp_path / "qs"))
    assert result.returncode == 0, result.stderr
    assert "max abs diff 0.0" in result.stdout and "Done." in result.stdout
    assert os.path.exists(tmp_path / "qs" / "soup-hf" / "config.json")
    again = run_tsllm("quickstart", "--workdir", str(tmp_path / "qs"))  # idempotent
    assert again.returncode == 0, again.stderr


@needs_unshare
def test_tag_delete_on_read_only_store_is_exit_8(tmp_path, tiny_family):
    result = _in_small_fs(tmp_path, f"""
        $PY -m tensorstore_llm_cli -q --store $FS/store import {tiny_family['base']} --name base >/dev/null
        mount -o remount,ro $FS
        $PY -m tensorstore_llm_cli --store $FS/store tag -d base; echo "rc=$?" """)
    assert "rc=8" in result.stdout and "read-only" in result.stderr, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1
