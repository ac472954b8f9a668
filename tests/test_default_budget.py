"""The default --max-memory, "auto": one constant behind every default, and the budget it gives a
plan follows its rule (1/8 of the bytes the plan reads, within [64 MiB, 2 GiB], and at least twice
the largest smallest block), checked against the rule computed here from the shapes alone.

Model-shaped inputs live in sparse safetensors files (the header declares real shapes: a 250m-, a
1 GB- and a 70B-shaped Llama; the data is a hole), and only executors' plans and dry runs look at
them, so nothing here reads or writes more than a few KB.
"""
import ast
import json
import pathlib
import struct

import pytest

from tensorstore_llm.default_budget import (
    AUTO_CAP,
    AUTO_FLOOR,
    DEFAULT_MAX_MEMORY,
    budget_bytes,
    is_auto,
)
from tensorstore_llm.engine import Executor, plan_map
from tensorstore_llm.engine.options import RunOptions
from tensorstore_llm.io.hf_dir import HFCheckpointSource
from tensorstore_llm.testing.synth import shape_of, tensor_metas

MIB = 1 << 20
ITEMSIZE = {"F32": 4, "BF16": 2}
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sparse_model(directory: pathlib.Path, tensors: dict) -> str:
    """An HF directory whose model.safetensors declares ``tensors`` (name -> (dtype, shape)); data is a hole."""
    directory.mkdir(parents=True)
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = ITEMSIZE[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        f.truncate(8 + len(body) + offset)
    return str(directory)


def _llama(directory, preset, layers=None) -> tuple[str, int]:
    """A sparse bf16 Llama of ``preset``; returns (directory, bytes of its tensors)."""
    metas = tensor_metas(shape_of(preset, layers))
    tensors = {m.name: ("BF16", m.shape) for m in metas}
    nbytes = sum(2 * m.shape[0] * (m.shape[1] if len(m.shape) > 1 else 1) for m in metas)
    return _sparse_model(directory, tensors), nbytes


# -- one constant ------------------------------------------------------------------------------

def _max_memory_defaults():
    """(file:line, default expression) of every ``max_memory`` parameter default and every
    ``.get("max_memory", default)`` in the package and the CLI."""
    found = []
    for path in [*(ROOT / "tensorstore_llm").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        name = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                positional = args.posonlyargs + args.args
                pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
                pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
                found += [(f"{name}:{d.lineno}", ast.unparse(d)) for a, d in pairs if a.arg == "max_memory"]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                  and len(node.args) == 2 and isinstance(node.args[0], ast.Constant) and node.args[0].value == "max_memory"):
                found.append((f"{name}:{node.lineno}", ast.unparse(node.args[1])))
    return found


def test_every_default_is_the_one_constant():
    found = _max_memory_defaults()
    assert len(found) >= 10, found   # the scan sees the API's and the CLI's defaults
    # two deliberate exceptions: the quickstart demonstrates row blocks on a tiny model, and
    # store_delta takes bytes (its callers resolve "auto" by budget_bytes) with AUTO_CAP's value
    others = {where.split(":")[0]: default for where, default in found if default != "DEFAULT_MAX_MEMORY"}
    assert others == {"tensorstore_llm/quickstart.py": "'256K'", "tensorstore_llm/diff/store.py": "2 << 30"}, others
    assert eval(others["tensorstore_llm/diff/store.py"]) == AUTO_CAP
    assert DEFAULT_MAX_MEMORY == "auto" and RunOptions().max_memory == DEFAULT_MAX_MEMORY


def test_every_command_defaults_to_auto_and_the_cli_reads_auto(cli, tmp_path):
    import click

    from tensorstore_llm_cli import cli as group

    def commands(g, prefix=""):
        ctx = click.Context(g)
        for name in g.list_commands(ctx):
            c = g.get_command(ctx, name)
            yield from commands(c, f"{prefix}{name} ") if isinstance(c, click.Group) else [(prefix + name, c)]
    defaults = {path: p.default for path, c in commands(group) for p in c.params if p.name == "max_memory"}
    assert len(defaults) >= 10 and defaults.pop("quickstart") == "256K", defaults   # a demonstration of row blocks
    assert set(defaults.values()) == {"auto"}, defaults
    model = _sparse_model(tmp_path / "m", {"w": ("F32", [64, 64])})
    for spelling in ("auto", "AUTO"):
        code, out, err = cli("--store", tmp_path / "s", "import", model, "--max-memory", spelling, "--dry-run")
        assert code == 0 and f"(budget {AUTO_FLOOR // MIB}.0 MiB)" in out, (out, err)
    code, _, err = cli("--store", tmp_path / "s", "import", model, "--max-memory", "automatic", "--dry-run")
    assert code == 2 and "automatic" in err, err


def test_budget_bytes_outside_plans():
    """diff creation and apply stream no plan: there "auto" is the 2 GiB they always had."""
    assert budget_bytes("auto") == budget_bytes(" Auto ") == AUTO_CAP == 2 << 30
    assert budget_bytes("512M") == 512 * MIB and budget_bytes(12345) == 12345
    assert is_auto("auto") and not is_auto("2G") and not is_auto(1 << 30)


# -- the rule ------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, layers, expected_mib", [
    ("100m", 13, 93.7),       # the 250m benchmark family: 3 x 262 MB read -> 1/8
    ("1gb", None, 384.0),     # 3 x 1.07 GB -> 1/8
    ("70b-1layer", None, 2048.0),   # 3 x 5.9 GB: 1/8 is above the cap, so 2 GiB as before "auto"
])
def test_auto_budget_of_a_three_model_merge(tmp_path, preset, layers, expected_mib):
    dirs = []
    for k in range(3):
        d, nbytes = _llama(tmp_path / f"m{k}", preset, layers)
        dirs.append(d)
    rule = min(AUTO_CAP, max(AUTO_FLOOR, 3 * nbytes // 8))
    sources = {f"m{k}": HFCheckpointSource(d) for k, d in enumerate(dirs)}
    try:
        plan = plan_map("weighted_sum", sources, {"models": list(sources)}, params={"weights": [0.2, 0.3, 0.5]})
        executor = Executor(plan, None, RunOptions(device="cpu", progress=False))
        assert executor.budget == rule and executor.budget / MIB == pytest.approx(expected_mib, abs=0.05)
        estimate = executor.estimate()
        assert estimate.budget == rule and estimate.over_budget == []
        # the same plan at an explicit budget is as before: the number given
        assert Executor(plan, None, RunOptions(device="cpu", max_memory="2G")).budget == 2 << 30
    finally:
        for s in sources.values():
            s.close()


def test_auto_holds_a_whole_tensor_job_with_one_ahead(tmp_path):
    """A job that needs its whole tensor (a lossy delta's low-rank reconstruction) raises the budget
    to twice its smallest block, which a fixed small default would refuse."""
    shapes = {"big": ("F32", [4096, 4096]), "small": ("F32", [256, 256])}
    base, target = _sparse_model(tmp_path / "base", shapes), _sparse_model(tmp_path / "target", shapes)
    with HFCheckpointSource(base) as b, HFCheckpointSource(target) as t:
        plan = plan_map("delta_low_rank", {"b": b, "t": t}, {"base": "b", "target": "t"}, params={"rank": 8})
        executor = Executor(plan, None, RunOptions(device="cpu", progress=False))
        big = next(j for j in plan.jobs if j.output.name == "big")
        # at least both inputs as stored and as the fp32 copies the kernel reads: 4 x 64 MiB
        assert executor.min_block_bytes(big) >= 4 * 4096 * 4096 * 4
        assert executor.budget == 2 * executor.min_block_bytes(big) > AUTO_FLOOR
        assert executor.estimate().over_budget == []
        with pytest.raises(Exception, match="give --max-memory"):
            Executor(plan, None, RunOptions(device="cpu", max_memory="128M"))


def test_auto_never_exceeds_the_cap_a_bigger_row_is_refused_with_its_need(tmp_path, cli):
    row = 2**27   # one fp32 row of 512 MiB: a copy holds 3 input and 3 output rows, 3 GiB
    model = _sparse_model(tmp_path / "m", {"wide": ("F32", [1, row])})
    code, out, err = cli("--store", tmp_path / "s", "import", model, "--dry-run")
    assert code == 7 and out == "" and str(6 * 4 * row) in err and str(AUTO_CAP) in err and "--max-memory" in err, err
