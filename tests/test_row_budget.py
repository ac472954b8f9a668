"""A row larger than --max-memory is refused before any allocation, naming the bytes it needs;
shapes whose dimensions overflow 64 bits are refused when a header is read or written.

Big tensors live in sparse files: the header declares the shape, the data is a hole, so nothing
here writes or reads gigabytes.
"""
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tensorstore_llm import api
from tensorstore_llm.engine import Executor, plan_map
from tensorstore_llm.errors import FormatError, RecipeError
from tensorstore_llm.io.base import TensorMeta
from tensorstore_llm.io.hf_dir import HFCheckpointSink, HFCheckpointSource
from tensorstore_llm.io.safetensors_format import build_header
from tensorstore_llm.store import Store

ITEMSIZE = {"F32": 4, "BF16": 2}


def _sparse_safetensors(path, tensors: dict) -> str:
    """A safetensors file declaring ``tensors`` (name -> (dtype, shape)) whose data is a hole."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = ITEMSIZE[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        f.truncate(8 + len(body) + offset)
    return str(path)


def _run_measured(args, tmp_path):
    """``tsllm ARGS`` in a subprocess; returns (exit code, stderr, peak RSS in MiB of that process)."""
    rss_file = tmp_path / f"rss-{len(os.listdir(tmp_path))}"
    code = ("import resource\nfrom tensorstore_llm_cli import main\n"
            f"try:\n    main({[str(a) for a in args]!r})\n"
            f"finally:\n    open({str(rss_file)!r}, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return done.returncode, done.stderr, int(rss_file.read_text()) / 1024


def test_row_larger_than_budget_is_refused_before_allocation(tmp_path):
    row = 2**25  # one fp32 row of 128 MiB, at a budget of 8 MiB
    big = _sparse_safetensors(tmp_path / "big.safetensors", {"wide": ("F32", [1, row])})
    small = tmp_path / "small"
    small.mkdir()
    save_file({"w": torch.zeros(4, 4)}, str(small / "model.safetensors"))
    root = tmp_path / "store"
    base_code, base_err, base_rss = _run_measured(["--store", root, "import", small, "--max-memory", "8M"], tmp_path)
    assert base_code == 0, base_err
    code, err, rss = _run_measured(["--store", root, "import", big, "--max-memory", "8M"], tmp_path)
    assert code == 7, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    # copy holds 3 input and 3 output blocks of one row each: 6 x 128 MiB
    assert "'wide'" in err and "big.safetensors" in err and str(6 * 4 * row) in err and "--max-memory" in err, err
    assert rss < base_rss + 48, (rss, base_rss)  # the 128 MiB row was never read or allocated
    assert [a.id for a in Store(str(root)).list()] and len(Store(str(root)).list()) == 1  # only the small import
    assert os.listdir(root / "staging") == []


def test_dry_run_reports_a_huge_row_with_the_bytes_needed(tmp_path, cli):
    row = 2**31  # the case: [1, 2^31] fp32 at 64M allocated 8 GiB
    big = _sparse_safetensors(tmp_path / "huge.safetensors", {"wide": ("F32", [1, row])})
    code, out, err = cli("--store", tmp_path / "store", "import", big, "--max-memory", "64M", "--dry-run")
    assert code == 7 and out == "" and str(6 * 4 * row) in err and "67108864" in err, err
    code, _, err = cli("--store", tmp_path / "store", "import", big, "--max-memory", "64M")
    assert code == 7 and str(6 * 4 * row) in err, err
    assert not os.path.exists(tmp_path / "store" / "artifacts") or not os.listdir(tmp_path / "store" / "artifacts")


def test_export_convert_and_merge_of_a_wide_artifact_are_refused(tmp_path, cli):
    row = 2**22  # 16 MiB row
    src = tmp_path / "wide"
    src.mkdir()
    save_file({"wide": torch.ones(1, row), "narrow": torch.ones(8, 8)}, str(src / "model.safetensors"))
    s = str(tmp_path / "store")
    assert cli("--store", s, "import", src, "--name", "w")[0] == 0
    out = tmp_path / "out"
    for args in (["export", "w", out, "--max-memory", "8M"], ["export", "w", out, "--max-memory", "8M", "--dry-run"],
                 ["convert", "w", "--dtype", "bf16", "--max-memory", "8M"],
                 ["weighted-sum", "w", "w", "--weights", "0.5,0.5", "--max-memory", "8M"]):
        code, _, err = cli("--store", s, *args)
        assert code == 7 and "'wide'" in err and "needs" in err, (args, err)
    assert not out.exists() and [p for p in os.listdir(tmp_path) if "partial" in p] == []
    assert os.listdir(os.path.join(s, "staging")) == [] and len(Store(s).list()) == 1
    code, _, err = cli("--store", s, "export", "w", out, "--max-memory", "128M")
    assert code == 0, err
    with HFCheckpointSource(str(out)) as back:
        assert torch.equal(back.read("wide"), torch.ones(1, row))


def test_a_row_that_fits_is_never_refused_and_the_estimate_agrees(tiny_family):
    with HFCheckpointSource(tiny_family["base"]) as src:
        plan = plan_map("weighted_sum", {"a": src}, {"models": ["a"]}, params={"weights": [1.0]})
        smallest = max(Executor(plan, None, max_memory="1G").min_block_bytes(j) for j in plan.jobs)
        est = Executor(plan, None, max_memory=smallest).estimate()  # exactly one row of the widest tensor
        assert est.over_budget == [] and est.peak_bytes <= smallest
        with pytest.raises(RecipeError, match=rf"needs .* \({smallest} bytes\).*budget of .* \({smallest - 1} bytes\)"):
            Executor(plan, None, max_memory=smallest - 1)


def test_empty_tensors_need_no_memory(tmp_path, store):
    path = _sparse_safetensors(tmp_path / "empty.safetensors", {"e": ("F32", [0, 2**20, 2**10]), "x": ("F32", [2, 2])})
    result = api.import_checkpoint(path, store, max_memory="4K", progress=False)
    with store.open(result.artifact.id) as src:
        assert tuple(src.meta("e").shape) == (0, 2**20, 2**10) and src.read("x").shape == (2, 2)


@pytest.mark.parametrize("shape", [[2**62, 2**62, 0], [0, 2**62, 2**62], [2**61, 0, 4], [0, 2**64]])
def test_zero_size_shape_that_overflows_is_refused(tmp_path, cli, shape):
    path = _sparse_safetensors(tmp_path / "overflow.safetensors", {"ok": ("F32", [2]), "boom": ("F32", shape)})
    with pytest.raises(FormatError, match=r"overflow.safetensors: tensor 'boom': shape .* too large"):
        HFCheckpointSource(path)
    code, _, err = cli("--store", tmp_path / "store", "import", path)
    assert code == 4 and "'boom'" in err and err.count("\n") == 1, err


def test_largest_zero_size_shape_that_fits_is_accepted(tmp_path):
    path = _sparse_safetensors(tmp_path / "edge.safetensors", {"edge": ("F32", [2**61 - 1, 0]), "bf": ("BF16", [0, 2**62 - 1])})
    with HFCheckpointSource(path) as src:
        assert src.meta("edge").shape == (2**61 - 1, 0) and src.read("edge").numel() == 0
    with pytest.raises(FormatError, match="'edge'"):
        HFCheckpointSource(_sparse_safetensors(tmp_path / "over.safetensors", {"edge": ("F32", [2**61, 0])}))


def test_writing_an_overflowing_shape_is_refused(tmp_path):
    meta = TensorMeta("boom", (2**62, 2**62, 0), "float32")
    with pytest.raises(FormatError, match="'boom'.*too large"):
        build_header([meta])
    sink = HFCheckpointSink(str(tmp_path / "out"))
    with pytest.raises(FormatError, match=r"out: tensor 'boom'"):
        sink.prepare([TensorMeta("fine", (2,), "float32"), meta])
    sink.abort()
    assert os.listdir(tmp_path) == []
