"""Exact top-k (issue 14, item 3): TIES and breadcrumbs keep exactly the requested number of
entries of each task vector, and ties at a threshold are broken by flat index (of equal
magnitudes, the earlier entry in row-major order counts as the larger), the same under any
blocking and after a resume.

The models here have task vectors of a few distinct magnitudes (multiples of 1/16), so a large
share of every tensor ties at the threshold; the base is zero, so the merged tensor is the kept
task vector itself, exactly.
"""
import os

import pytest
import torch
from safetensors.torch import save_file

from tensorstore_llm import api
from tensorstore_llm.store import Store

from conftest import kill_after_journal_lines, run_tsllm

SHAPES = {"model.norm.weight": (3000,), "model.layers.0.mlp.up_proj.weight": (96, 40),
          "model.embed_tokens.weight": (257, 64)}


def _write(path, tensors):
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory):
    """base (zeros), ft1, ft2 (fp32) whose entries are ±1..±4 / 16: thousands of ties per tensor."""
    root = tmp_path_factory.mktemp("tied-family")
    g = torch.Generator().manual_seed(3)
    paths = {"base": str(root / "base")}
    _write(paths["base"], {name: torch.zeros(shape) for name, shape in SHAPES.items()})
    for k in (1, 2):
        ft = {}
        for name, shape in SHAPES.items():
            magnitude = torch.randint(1, 5, shape, generator=g).float() / 16
            ft[name] = magnitude * (torch.randint(0, 2, shape, generator=g).float() * 2 - 1)
        paths[f"ft{k}"] = str(root / f"ft{k}")
        _write(paths[f"ft{k}"], ft)
    return paths


def _rank_order(tau: torch.Tensor) -> torch.Tensor:
    """Flat indices by magnitude descending, ties by flat index ascending (a stable sort)."""
    return torch.sort(tau.abs().reshape(-1), descending=True, stable=True).indices


def reference_ties_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """τ with all but its max(1, ⌊density·n⌋) largest entries (mergekit's count) set to 0."""
    keep = torch.zeros(tau.numel(), dtype=torch.bool)
    keep[_rank_order(tau)[:max(1, int(density * tau.numel()))]] = True
    return tau * keep.reshape(tau.shape)


def reference_breadcrumbs_trim(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """τ keeping ranks [top, top + ⌊density·n⌋) of the descending order (mergekit's counts)."""
    n = tau.numel()
    target = int(density * n)
    top = n - max(0, n - target - int(gamma * n)) - target
    keep = torch.zeros(n, dtype=torch.bool)
    keep[_rank_order(tau)[top:top + target]] = True
    return tau * keep.reshape(tau.shape)


def _recipe(family, method, density, extra=""):
    return (f"merge_method: {method}\nbase_model: {family['base']}\nmodels:\n"
            f"  - model: {family['ft1']}\n    parameters: {{weight: 1.0, density: {density}{extra}}}\n"
            f"dtype: float32\nout_dtype: float32\n")


def _read_all(store, artifact):
    with store.open(artifact.id) as reader:
        return {name: reader.read(name) for name in reader.keys()}


def _ft(family, k=1):
    from safetensors.torch import load_file
    return load_file(os.path.join(family[f"ft{k}"], "model.safetensors"))


@pytest.mark.parametrize("density", [0.3, 0.55])
def test_ties_trim_keeps_exactly_k_with_flat_index_tie_break(tmp_path, tied_family, density):
    store = Store(str(tmp_path / "store"))
    # one model, weight 1, TIES: the elected sign is the model's, so the output is its trimmed τ
    merged = _read_all(store, api.merge(store, _recipe(tied_family, "ties", density), progress=False).artifact)
    for name, tau in _ft(tied_family).items():
        expected = reference_ties_trim(tau, density)
        assert int((merged[name] != 0).sum()) == max(1, int(density * tau.numel())), name
        assert torch.equal(merged[name], expected), name


def test_breadcrumbs_trim_keeps_exactly_target(tmp_path, tied_family):
    store = Store(str(tmp_path / "store"))
    text = _recipe(tied_family, "breadcrumbs", 0.4, extra=", gamma: 0.1")
    merged = _read_all(store, api.merge(store, text, progress=False).artifact)
    for name, tau in _ft(tied_family).items():
        assert int((merged[name] != 0).sum()) == int(0.4 * tau.numel()), name
        assert torch.equal(merged[name], reference_breadcrumbs_trim(tau, 0.4, 0.1)), name


@pytest.mark.parametrize("method,extra", [("ties", ""), ("breadcrumbs_ties", ", gamma: 0.05")])
def test_same_bits_under_any_blocking(tmp_path, tied_family, method, extra):
    text = (f"merge_method: {method}\nbase_model: {tied_family['base']}\nmodels:\n"
            f"  - model: {tied_family['ft1']}\n    parameters: {{weight: 1.0, density: 0.35{extra}}}\n"
            f"  - model: {tied_family['ft2']}\n    parameters: {{weight: 0.5, density: 0.6{extra}}}\n")
    results = []
    for label, budget in (("whole", "1G"), ("blocked", "16K"), ("rows", "6K")):
        store = Store(str(tmp_path / label))
        results.append(_read_all(store, api.merge(store, text, progress=False, max_memory=budget).artifact))
    for name in SHAPES:
        assert torch.equal(results[0][name], results[1][name]), name
        assert torch.equal(results[0][name], results[2][name]), name


def test_effective_density_is_recorded_per_tensor(tmp_path, tied_family):
    store = Store(str(tmp_path / "store"))
    text = (f"merge_method: ties\nbase_model: {tied_family['base']}\nmodels:\n"
            f"  - model: {tied_family['ft1']}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
            f"  - model: {tied_family['ft2']}\n    parameters: {{weight: 1.0, density: 0.7}}\n")
    artifact = api.merge(store, text, progress=False).artifact
    record = artifact.manifest.recipe["effective_density"]
    for name, shape in SHAPES.items():
        n = torch.Size(shape).numel()
        assert record[name] == [max(1, int(0.3 * n)) / n, max(1, int(0.7 * n)) / n], name


def test_resume_after_kill_gives_the_same_bits(tmp_path, tied_family):
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {tied_family['base']}\nmodels:\n"
                      f"  - model: {tied_family['ft1']}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
                      f"  - model: {tied_family['ft2']}\n    parameters: {{weight: 0.7, density: 0.5}}\n")
    root = str(tmp_path / "store")
    args = ["--store", root, "merge", recipe, "--name", "m", "--max-memory", "8K"]
    kill_after_journal_lines(args, root, lines=2)
    rerun = run_tsllm(*args)
    assert rerun.returncode == 0, rerun.stderr
    clean = str(tmp_path / "clean")
    assert run_tsllm("--store", clean, "merge", recipe, "--max-memory", "8G").returncode == 0
    assert Store(root).get("m").id == Store(clean).list()[0].id


def _awkward_tiles():
    """(base, model) fp32 tile pairs: bf16-like few-valued deltas (many ties), signed zeros,
    infinities and NaNs, a 1-row and a ragged shape."""
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(64, 96, generator=g) * 0.02).to(torch.bfloat16).float()
    model = (base + torch.randint(-4, 5, base.shape, generator=g).float() / 512).to(torch.bfloat16).float()
    special = model.clone()
    special[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    special[1, :2] = base[1, :2]                     # zero deltas
    special[2, :1] = -float("nan")
    yield base, model
    yield base, special
    yield base[:1], model[:1]
    yield base.reshape(-1)[:1000], model.reshape(-1)[:1000]


@pytest.mark.parametrize("tile", range(4))
def test_compiled_statistics_equal_the_torch_path(monkeypatch, tile):
    """topk_kernels' numba loops and its torch path give the same integers on every tile."""
    from tensorstore_llm.ops import select, topk_kernels
    pytest.importorskip("numba")
    base, model = list(_awkward_tiles())[tile]
    rows = base.shape[0] if base.dim() > 1 else 1
    magnitude_bits = select.magnitude_bits(model - base)
    high_bins = sorted({int(b) >> 16 for b in magnitude_bits[:50]} | {0, 0x7FFF})
    thresholds = sorted({float(v) for v in (model - base).abs().reshape(-1)[:20]}) + [0.0, float("inf"), float("nan")]
    found = {}
    for compiled in (True, False):
        monkeypatch.setattr(topk_kernels, "USE_NUMBA", compiled)
        found[compiled] = ([topk_kernels.high_histogram(base, model)]
                           + [topk_kernels.low_histogram(base, model, h) for h in high_bins]
                           + [topk_kernels.row_ties(base, model, rows, t) for t in thresholds])
    assert all(torch.equal(a, b) for a, b in zip(found[True], found[False]))
    # bf16 tiles as stored (the engine skips its cast for these passes): the integers of their
    # fp32 copies (the bf16 rounding turns NaN into another NaN pattern, so not those above)
    stored_base, stored_model = base.bfloat16(), model.bfloat16()
    for stored, compiled in (((stored_base, stored_model), True), ((stored_base.float(), stored_model.float()), False)):
        monkeypatch.setattr(topk_kernels, "USE_NUMBA", compiled)
        found[compiled] = ([topk_kernels.high_histogram(*stored)] + [topk_kernels.low_histogram(*stored, h) for h in high_bins]
                           + [topk_kernels.row_ties(*stored, rows, t) for t in thresholds])
    assert all(torch.equal(a, b) for a, b in zip(found[True], found[False]))
    monkeypatch.setattr(topk_kernels, "USE_NUMBA", False)
    found[False] = ([topk_kernels.high_histogram(base, model)] + [topk_kernels.low_histogram(base, model, h) for h in high_bins]
                    + [topk_kernels.row_ties(base, model, rows, t) for t in thresholds])
    # and the torch path is the direct formula
    assert torch.equal(found[False][0], torch.bincount(magnitude_bits >> 16, minlength=select.HI_BINS))
    direct_ties = ((model - base).abs().reshape(rows, -1) == thresholds[0]).sum(1)
    assert torch.equal(found[False][len(high_bins) + 1], direct_ties)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties"])
def test_torch_path_merge_gives_the_same_bits(monkeypatch, tmp_path, tied_family, method):
    """A TIES / DARE-TIES / breadcrumbs-TIES merge on the torch paths (statistics, DARE's draw, TIES's fused loop)
    equals the compiled one, blocked and whole."""
    from tensorstore_llm.ops import dare_mask, topk_kernels
    text = (f"merge_method: {method}\nbase_model: {tied_family['base']}\nmodels:\n"
            f"  - model: {tied_family['ft1']}\n    parameters: {{weight: 1.0, density: 0.35}}\n"
            f"  - model: {tied_family['ft2']}\n    parameters: {{weight: 0.5, density: 0.6}}\n")
    results = []
    for compiled, budget in ((True, "16K"), (False, "16K"), (True, "1G")):
        monkeypatch.setattr(topk_kernels, "USE_NUMBA", compiled)
        monkeypatch.setattr(dare_mask, "USE_NUMBA", compiled)
        store = Store(str(tmp_path / f"compiled-{compiled}-{budget}"))
        results.append(_read_all(store, api.merge(store, text, progress=False, max_memory=budget).artifact))
    for name in SHAPES:
        assert torch.equal(results[0][name], results[1][name]), name
        assert torch.equal(results[0][name], results[2][name]), name


@pytest.mark.parametrize("shape,start,stop", [((300, 4096), 0, 128), ((300, 4096), 128, 256), ((300, 4096), 200, 300),
                                              ((300, 4096), 5, 290), ((5000,), 1000, 4999), ((7, 3, 5), 2, 7)])
@pytest.mark.parametrize("density", [0.5, 0.3, 1 / 3])
def test_compiled_dare_drop_equals_the_seeded_torch_mask(monkeypatch, shape, start, stop, density):
    """dare_mask.dropped draws seeding.uniform_rows' numbers itself: the same kept entries and
    values (signed zeros, NaN and infinities included) as the torch mask, for tiles that start
    inside a random row group or span several (rng group of 4096-wide rows: 128 rows)."""
    pytest.importorskip("numba")
    from tensorstore_llm.ops import dare_mask
    from tensorstore_llm.ops.registry import OpContext
    from tensorstore_llm.seeding import uniform_rows
    g = torch.Generator().manual_seed(5)
    delta = torch.randn((stop - start, *shape[1:]), generator=g)
    delta.reshape(-1)[:6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -1.0])
    ctx = OpContext("task_arithmetic", "model.layers.0.mlp.up_proj.weight", shape, start, stop, seed=17)
    kept = dare_mask.dropped(ctx, "task_arithmetic/model1", delta, density)
    uniform = uniform_rows(17, "task_arithmetic/model1", ctx.output, shape, start, stop).reshape(delta.shape)
    expected = delta * uniform.neg_().add_(density).sign_().clamp_min_(0)   # the torch path of sparsify.py
    assert torch.equal(kept.view(torch.int32), expected.view(torch.int32))
    direct = torch.where(uniform_rows(17, "task_arithmetic/model1", ctx.output, shape, start, stop).reshape(delta.shape)
                         < torch.tensor(density, dtype=torch.float32), delta, delta * 0)
    assert torch.equal(kept.view(torch.int32), direct.view(torch.int32))
    monkeypatch.setattr(dare_mask, "USE_NUMBA", False)
    assert dare_mask.dropped(ctx, "task_arithmetic/model1", delta, density) is None


@pytest.mark.parametrize("shape,tile_rows", [((40, 64), 7), ((70000,), 70000), ((70000,), 9000), ((3, 5, 4), 2)])
def test_ties_counted_by_the_low_pass_equal_the_tie_pass(monkeypatch, shape, tile_rows):
    """The low pass lists its bin's entries (row << 16 | low bits; int64 where a tile has 2^16
    rows or more) and counts the tied ones per row: the same ``tie_before`` as the tie pass, on
    bf16 tiles as stored and on fp32 copies."""
    pytest.importorskip("numba")
    from tensorstore_llm.ops import topk
    from tensorstore_llm.ops.merge import TaskArithmeticParams
    from tensorstore_llm.ops.registry import OpContext
    from tensorstore_llm.ops.sparsify import sparsify_passes
    g = torch.Generator().manual_seed(sum(shape))
    base = (torch.randn(shape, generator=g) * 0.02).bfloat16()
    models = [(base.float() + torch.randint(-3, 4, shape, generator=g).float() / 256).bfloat16() for _ in range(2)]
    params = TaskArithmeticParams(weights=(0.5, 0.5), densities=(0.3, 0.55), sparsification="magnitude", consensus="sum")

    def statistics(cast):
        stats = None
        for stats_pass in sparsify_passes(params):
            partials = []
            for start in range(0, shape[0], tile_rows):
                stop = min(shape[0], start + tile_rows)
                ctx = OpContext("task_arithmetic", "t", shape, start, stop, 0, "cpu", stats)
                partials.append(stats_pass.map(ctx, params, base=cast(base[start:stop]),
                                               models=[cast(m[start:stop]) for m in models]))
            whole = OpContext("task_arithmetic", "t", shape, 0, shape[0], 0, "cpu", stats)
            stats = {**(stats or {}), **stats_pass.reduce(params, partials, whole)}
        return stats

    listed = statistics(lambda x: x)
    assert listed["listed"] and {key for key, (n, t) in
                                 ((k, v) for i, c in listed["ties"].items() for k, v in (((i, j), x) for j, x in enumerate(c)))
                                 if 0 < n < t} <= set(listed["tie_before"]), "the low pass counted no tie"
    assert torch.equal(statistics(torch.Tensor.float)["tie_before"][(0, 0)], listed["tie_before"][(0, 0)])
    monkeypatch.setattr(topk, "LISTED_BYTES", 0)
    counted = statistics(lambda x: x)
    assert not counted["listed"]
    assert counted["thresholds"] == listed["thresholds"] and counted["ties"] == listed["ties"]
    assert counted["tie_before"].keys() == listed["tie_before"].keys()
    for key, value in counted["tie_before"].items():
        assert torch.equal(value, listed["tie_before"][key]), key
