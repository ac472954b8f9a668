"""DELLA is independent of --max-memory and of the executor's tiles (issue 8, item 8).

Ranks of a 1-D tensor are taken over the whole tensor (a statistics pass), ranks of 2-D tensors
per row (rows are never split); tied magnitudes rank by position. The models here have many tied
|τ| values, so ranking per block or per tile would change the keep probabilities and the result.
"""
import os

import pytest
import torch
from safetensors.torch import save_file

from tensorstore_llm.engine import executor
from tensorstore_llm.seeding import uniform_rows
from tensorstore_llm.store import Store

VECTOR, MATRIX = "model.norm.weight", "model.layers.0.mlp.up_proj.weight"
N, ROWS, COLS = 3000, 96, 40
SEED = 7


def _write(path, tensors):
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base, ft1, ft2 (fp32) whose task vectors are multiples of 1/16: many tied magnitudes."""
    root = tmp_path_factory.mktemp("della-family")
    g = torch.Generator().manual_seed(0)
    base = {VECTOR: torch.randn(N, generator=g), MATRIX: torch.randn(ROWS, COLS, generator=g)}
    paths = {"base": str(root / "base")}
    _write(paths["base"], base)
    for k in (1, 2):
        ft = {name: t + torch.randint(-4, 5, t.shape, generator=g).float() / 16 for name, t in base.items()}
        paths[f"ft{k}"] = str(root / f"ft{k}")
        _write(paths[f"ft{k}"], ft)
    return paths


def _recipe(tmp_path, method, extra=""):
    path = tmp_path / f"{method}.yaml"
    path.write_text(f"merge_method: {method}\nbase_model: base\nmodels:\n"
                    f"  - model: ft1\n    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.2}}\n"
                    f"  - model: ft2\n    parameters: {{weight: 0.5, density: 0.4, epsilon: 0.1}}\n{extra}")
    return path


def _merge(cli, tmp_path, family, recipe, label, budget, device="cpu"):
    root = tmp_path / f"store-{label}"
    for name, path in family.items():
        code, _, err = cli("--store", root, "-q", "import", path, "--name", name)
        assert code == 0, err
    code, _, err = cli("--store", root, "-q", "merge", recipe, "--name", "m", "--max-memory", budget, "--seed", SEED,
                       "--device", device)
    assert code == 0, err
    store = Store(str(root))
    return store, store.get("m")


@pytest.mark.parametrize("method,extra", [("della", ""), ("della_linear", ""),
                                          ("della", "parameters: {rescale_method: l1}\n")])
def test_della_is_bit_identical_for_every_budget_and_tile(cli, tmp_path, family, monkeypatch, method, extra):
    recipe = _recipe(tmp_path, method, extra)
    _, whole = _merge(cli, tmp_path, family, recipe, "whole", "1G")
    budgets = ["24K", "8K", "4K"]   # 1-D tensor in ~10 to ~60 blocks; the matrix in ~14 to 96 blocks
    results = {b: _merge(cli, tmp_path, family, recipe, b, b)[1] for b in budgets}
    monkeypatch.setattr(executor, "TILE_ELEMENTS_CPU", 256)   # several kernel tiles inside one block
    _, tiled = _merge(cli, tmp_path, family, recipe, "tiled", "1G")
    for label, artifact in [*results.items(), ("tiles of 256", tiled)]:
        assert artifact.manifest.tensors == whole.manifest.tensors, label
        assert artifact.id == whole.id, label


def test_small_budgets_really_split_both_tensors(family):
    """The budgets above split the 1-D and the 2-D tensor into several row blocks."""
    from tensorstore_llm.io.hf_dir import HFCheckpointSource
    from tensorstore_llm.merge.recipe import load_recipe, plan_merge

    text = (f"merge_method: della\nbase_model: {family['base']}\nmodels:\n"
            f"  - model: {family['ft1']}\n    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.2}}\n")
    recipe = load_recipe(text)
    sources = {ref: HFCheckpointSource(ref) for ref in (family["base"], family["ft1"])}
    plan = plan_merge(recipe, sources)
    by_name = {j.output.name: j for j in plan.jobs}
    assert by_name[VECTOR].params.rank_pass and not by_name[MATRIX].params.rank_pass
    for budget in ("24K", "4K"):
        ex = executor.Executor(plan, None, max_memory=budget, device="cpu")
        assert ex.block_rows(by_name[VECTOR]) < N // 2
        assert ex.block_rows(by_name[MATRIX]) < ROWS // 2
    for s in sources.values():
        s.close()


def test_della_1d_matches_the_whole_tensor_formula(cli, tmp_path, family):
    """One model, della_linear, inverse rescale: out = base + τ·[u < p] / p with p from the ranks of
    |τ| over the whole 1-D tensor (stable), and per row for the matrix, at a budget splitting both."""
    recipe = tmp_path / "one.yaml"
    recipe.write_text("merge_method: della_linear\nbase_model: base\nmodels:\n"
                      "  - model: ft1\n    parameters: {weight: 1.0, density: 0.5, epsilon: 0.2}\n")
    store, art = _merge(cli, tmp_path, family, recipe, "formula", "4K")
    with store.open(art.id) as out, store.open("base") as b, store.open("ft1") as f:
        for name in (VECTOR, MATRIX):
            base, ft, got = b.read(name), f.read(name), out.read(name)
            tau = ft - base
            rows = tau.abs().reshape(1, -1) if tau.dim() == 1 else tau.abs()
            ranks = rows.argsort(dim=1, stable=True).argsort(dim=1, stable=True).to(torch.float32)
            p = ranks.div_(rows.shape[1] - 1).mul_(2 * 0.2).add_(0.5 - 0.2).reshape(tau.shape)
            u = uniform_rows(SEED, "task_arithmetic/model0", name, tuple(tau.shape), 0, tau.shape[0])
            expected = (tau * (u < p).float()).div_(p).mul_(1.0).add_(base)
            assert torch.equal(got, expected), name
            assert 0.4 < (got != base).float().mean().item() < 0.6, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_della_cuda_equals_cpu_at_every_budget(cli, tmp_path, family):
    """CUDA tiles are 2^26 elements, CPU tiles 2^19: whole-tensor ranks make both give the same bits."""
    recipe = _recipe(tmp_path, "della")
    _, cpu = _merge(cli, tmp_path, family, recipe, "cpu", "1G")
    for budget in ("1G", "8K"):
        _, cuda = _merge(cli, tmp_path, family, recipe, f"cuda-{budget}", budget, device="cuda")
        assert cuda.manifest.tensors == cpu.manifest.tensors, budget


def test_della_1d_l1_rescale_keeps_the_rank_probabilities(cli, tmp_path, family):
    """rescale_method l1 on a 1-D tensor split into blocks: the L1 pass must not alter the rank
    statistics the kernel reads (they were divided in place once): the kept set is [u < p] with p
    from the whole-tensor ranks, and survivors are scaled by |τ|₁ / |kept τ|₁."""
    recipe = tmp_path / "l1.yaml"
    recipe.write_text("merge_method: della_linear\nbase_model: base\nmodels:\n"
                      "  - model: ft1\n    parameters: {weight: 1.0, density: 0.5, epsilon: 0.2}\n"
                      "parameters: {rescale_method: l1}\n")
    store, art = _merge(cli, tmp_path, family, recipe, "l1", "4K")
    with store.open(art.id) as out, store.open("base") as b, store.open("ft1") as f:
        base, ft, got = b.read(VECTOR), f.read(VECTOR), out.read(VECTOR)
    tau = ft - base
    ranks = tau.abs().argsort(stable=True).argsort(stable=True).to(torch.float64)
    p = ranks / (N - 1) * (2 * 0.2) + (0.5 - 0.2)
    u = uniform_rows(SEED, "task_arithmetic/model0", VECTOR, (N,), 0, N).double()
    kept = u < p
    assert torch.equal(got != base, kept & (tau != 0))
    factor = tau.double().abs().sum() / (tau.double() * kept).abs().sum()
    torch.testing.assert_close(got.double(), base.double() + tau.double() * kept * factor, rtol=1e-6, atol=1e-6)
