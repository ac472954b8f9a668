"""A delta-stored input under a small --max-memory: the reader sizes its decode buffers and blocks in
flight by its share of the budget, so a 48 MiB tensor stored as 8 MiB delta blocks exports and
merges at 32M (which the fixed two-workers-plus-read-ahead reader refused), bit for bit, with the
measured peak within the budget."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tensorstore_llm.diff.reader import OVERLAP_LEVELS
from tensorstore_llm.engine.budget import RUNTIME_BYTES
from tensorstore_llm.store import Store

MIB = 1 << 20
BUDGET = 32 * MIB

# Exports artifact ARGV[2] of store ARGV[1] to ARGV[3] and ARGV[4] at --max-memory ARGV[5]; the
# first export loads every code path (the compiled decoder included), the second is measured: RSS growth above its own start
# (the high-water mark reset through /proc/self/clear_refs just before it).
_CHILD = r"""
import json, sys
from tensorstore_llm.runs import export
from tensorstore_llm.store import Store

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

store = Store(sys.argv[1])
export(store, sys.argv[2], sys.argv[3], max_memory=sys.argv[5])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start = status("VmRSS")
export(store, sys.argv[2], sys.argv[4], max_memory=sys.argv[5])
print(json.dumps({"start": start, "peak": status("VmHWM")}))
"""


@pytest.fixture(scope="module")
def delta_store(tmp_path_factory):
    """A store with base and ft (ft as an exact delta of base): a 24576 x 1024 bf16 weight (48 MiB,
    six 8 MiB delta blocks) and a norm."""
    root = tmp_path_factory.mktemp("delta-budget")
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(24576, 1024, generator=gen).bfloat16(), "norm": torch.ones(1024).bfloat16()}
    ft = {"w": (base["w"].float() + 1e-3 * torch.randn(24576, 1024, generator=gen)).bfloat16(),
          "norm": (base["norm"].float() + 1e-2 * torch.randn(1024, generator=gen)).bfloat16()}
    save_file(base, str(root / "base.safetensors"))
    save_file(ft, str(root / "ft.safetensors"))
    store = str(root / "store")
    for args in (["import", str(root / "base.safetensors"), "--name", "base"],
                 ["import", str(root / "ft.safetensors"), "--delta-of", "base", "--name", "ft"]):
        done = subprocess.run([sys.executable, "-m", "tensorstore_llm_cli", "-q", "--store", store, *args],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    return {"store": store, "ft": str(root / "ft.safetensors"), "root": root}


def _load(path):
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def _assert_same_bits(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k


def test_overlap_shrinks_with_the_budget(delta_store):
    with Store(delta_store["store"]).open("ft") as src:
        src.fit_read_memory(4 << 30)
        assert (src.workers, src.read_ahead) == OVERLAP_LEVELS[0]
        full = src.extra_read_bytes("w")
        assert full > BUDGET                       # what the fixed reader reserved: a 32M run was refused
        src.fit_read_memory(BUDGET)
        assert (src.workers, src.read_ahead) == (0, False)
        one = src.extra_read_bytes("w")
        # one block's rebuild: its parent rows and rebuilt rows (8 MiB each), its coded bytes and lanes
        block = 4096 * 1024 * 2
        assert 2 * block < one < 4 * block and one * 3 < full
        _assert_same_bits({k: src.read(k) for k in src.keys()}, load_file(delta_store["ft"]))
        part = src.read_rows("w", 100, 200)        # part of a block: a copy, not a view pinning the block
        assert part.untyped_storage().nbytes() == 100 * 1024 * 2


def test_export_at_32m_stays_within_budget_bit_for_bit(delta_store, tmp_path):
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}   # as the CLI runs itself
    done = subprocess.run([sys.executable, "-c", _CHILD, delta_store["store"], "ft", str(tmp_path / "a"),
                           str(tmp_path / "b"), str(BUDGET)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    grown = measured["peak"] - measured["start"]
    # the budget covers the tensor data (the engine's rows and the reader's decode buffers); the
    # engine's memory model adds RUNTIME_BYTES for code pages, thread stacks and arenas
    assert grown <= BUDGET + RUNTIME_BYTES, f"grew {grown / MIB:.1f} MiB at --max-memory 32M"
    want = load_file(delta_store["ft"])
    _assert_same_bits(_load(str(tmp_path / "a")), want)
    _assert_same_bits(_load(str(tmp_path / "b")), want)


def test_merge_with_delta_input_at_32m(delta_store, tmp_path, cli):
    code, _, err = cli("--store", delta_store["store"], "weighted-sum", "ft", "base", "--weights", "1,0",
                       "--name", "same", "--max-memory", "32M")
    assert code == 0, err
    store = Store(delta_store["store"])
    assert store.get("same").manifest.checksums() == store.get("ft").manifest.checksums()
