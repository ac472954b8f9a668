"""TIES in one compiled loop (``ops/ties_fused.py``) gives the torch path's bits: the magnitude
trims with their flat-index tie cut, the weights, the sum election, the normalisation and λ, on
tiles cut anywhere in a tensor, with signed zeros, NaN and infinities, negative weights and a
model left unsparsified; and a whole TIES merge equals the torch path's under any blocking.
"""
import math

import pytest
import torch

from tensorstore_llm.ops import ties_fused, topk_kernels
from tensorstore_llm.ops.merge import TaskArithmeticParams, task_arithmetic
from tensorstore_llm.ops.registry import OpContext
from tensorstore_llm.ops.sparsify import sparsify_passes

pytest.importorskip("numba")


def _family(shape, models, seed, special=False):
    """base and models (fp32 holding bf16 values) whose task vectors take a few values: many
    entries tie at every threshold."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16).float()
    out = []
    for _ in range(models):
        steps = torch.randint(-4, 5, shape, generator=g).float() / 512
        out.append((base + steps).to(torch.bfloat16).float())
    if special:
        flat = out[0].reshape(-1)
        flat[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0])
        out[1].reshape(-1)[3:6] = base.reshape(-1)[3:6]    # zero task vectors, one against a −0
        base.reshape(-1)[7] = -0.0
        out[0].reshape(-1)[7] = 0.0
    return base, out


def _statistics(params, name, base, models, tile_rows):
    """The TIES statistics of the whole tensor, computed tile by tile as the executor does."""
    shape, stats = tuple(base.shape), None
    for stats_pass in sparsify_passes(params):
        partials = []
        for start in range(0, shape[0], tile_rows):
            stop = min(shape[0], start + tile_rows)
            ctx = OpContext("task_arithmetic", name, shape, start, stop, 0, "cpu", stats)
            partials.append(stats_pass.map(ctx, params, base=base[start:stop], models=[m[start:stop] for m in models]))
        stats = {**(stats or {}), **stats_pass.reduce(params, partials, OpContext("task_arithmetic", name, shape, 0,
                                                                                  shape[0], 0, "cpu", stats))}
    return stats


def _tiles_both_ways(monkeypatch, params, base, models, tile_rows):
    """Per tile: (fused result or None, torch path result)."""
    stats = _statistics(params, "t", base, models, tile_rows)
    found = []
    for start in range(0, base.shape[0], tile_rows):
        stop = min(base.shape[0], start + tile_rows)
        ctx = OpContext("task_arithmetic", "t", tuple(base.shape), start, stop, 0, "cpu", stats)
        tiles = [m[start:stop].clone() for m in models]
        monkeypatch.setattr(ties_fused, "USE_NUMBA", True)
        fused = ties_fused.merged(ctx, params, base[start:stop].clone(), tiles)
        monkeypatch.setattr(ties_fused, "USE_NUMBA", False)
        found.append((fused, task_arithmetic(ctx, params, base[start:stop].clone(), [t.clone() for t in tiles])))
    return stats, found


def _bits(x):
    return x.contiguous().view(torch.int32)


CASES = {
    "ties, 2 models": (dict(weights=(0.3, 0.7), densities=(0.35, 0.6)), (96, 40), 2, 7),
    "3 models, a negative weight, lambda": (dict(weights=(1.0, -0.5, 0.25), densities=(0.2, 0.5, 0.9), lam=0.7),
                                           (50, 64), 3, 6),
    "not normalised": (dict(weights=(0.5, 0.5), densities=(0.5, 0.5), normalize=False), (64, 33), 2, 5),
    "one model unsparsified": (dict(weights=(0.6, 0.4), densities=(1.0, 0.3)), (40, 50), 2, 9),
    "1-D tensor": (dict(weights=(0.5, 0.5), densities=(0.5, 0.45)), (3000,), 2, 1000),
    "one row per tile": (dict(weights=(1.0, 1.0), densities=(0.1, 0.7)), (31, 257), 2, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_tiles_equal_the_torch_path(monkeypatch, case):
    kwargs, shape, n_models, tile_rows = CASES[case]
    params = TaskArithmeticParams(sparsification="magnitude", consensus="sum", normalize=kwargs.pop("normalize", True),
                                  **kwargs)
    base, models = _family(shape, n_models, seed=len(case))
    stats, found = _tiles_both_ways(monkeypatch, params, base, models, tile_rows)
    assert any(0 < needed < tied for counts in stats["ties"].values() for needed, tied in counts), "no tie cut tested"
    for fused, expected in found:
        assert fused is not None
        assert torch.equal(_bits(fused), _bits(expected))


def test_signed_zeros_and_non_finite_entries(monkeypatch):
    """NaN, ±inf, zero task vectors and −0 inputs: the compiled loop applies while the thresholds
    are finite and then gives the torch path's bits, zero signs and NaN included."""
    params = TaskArithmeticParams(weights=(0.5, 0.5), densities=(0.5, 0.6), sparsification="magnitude",
                                  consensus="sum", normalize=True)
    base, models = _family((24, 16), 2, seed=4, special=True)
    stats, found = _tiles_both_ways(monkeypatch, params, base, models, 5)
    assert all(math.isfinite(t[0]) for t in stats["thresholds"].values())
    for fused, expected in found:
        assert fused is not None
        assert torch.equal(_bits(fused), _bits(expected))
    assert torch.isnan(found[0][0]).any() and torch.isinf(found[0][0]).any()


def test_not_applicable_falls_back(monkeypatch):
    """DARE (random), breadcrumbs, rescaling, a zero density and the switch give None."""
    base, models = _family((8, 8), 2, seed=1)
    stats = {"thresholds": {0: [0.0], 1: [0.0]}}
    ctx = OpContext("task_arithmetic", "t", (8, 8), 0, 8, 0, "cpu", stats)
    for kwargs in (dict(sparsification="random"), dict(sparsification="magnitude_outliers"),
                   dict(sparsification="magnitude", rescale=True), dict(sparsification="magnitude", consensus="count")):
        params = TaskArithmeticParams(weights=(0.5, 0.5), densities=(0.5, 0.5), **{"consensus": "sum", **kwargs})
        assert ties_fused.merged(ctx, params, base, models) is None
    params = TaskArithmeticParams(weights=(0.5, 0.5), densities=(0.0, 0.5), sparsification="magnitude", consensus="sum")
    assert ties_fused.merged(ctx, params, base, models) is None
    params = TaskArithmeticParams(weights=(0.5, 0.5), densities=(0.5, 0.5), sparsification="magnitude", consensus="sum")
    assert ties_fused.merged(ctx, params, base, models) is not None
    monkeypatch.setattr(topk_kernels, "USE_NUMBA", False)
    assert ties_fused.merged(ctx, params, base, models) is None


@pytest.mark.parametrize("case", ["ties, 2 models", "1-D tensor"])
def test_stored_bf16_tiles_give_the_fp32_result(monkeypatch, case):
    """The loop widens bf16 tiles itself (the engine passes them as stored): the same bits as on
    the executor's fp32 copies."""
    kwargs, shape, n_models, tile_rows = CASES[case]
    params = TaskArithmeticParams(sparsification="magnitude", consensus="sum", normalize=True, **kwargs)
    base, models = _family(shape, n_models, seed=3)
    stats, found = _tiles_both_ways(monkeypatch, params, base, models, tile_rows)
    monkeypatch.setattr(ties_fused, "USE_NUMBA", True)
    for k, start in enumerate(range(0, shape[0], tile_rows)):
        stop = min(shape[0], start + tile_rows)
        ctx = OpContext("task_arithmetic", "t", shape, start, stop, 0, "cpu", stats)
        stored = ties_fused.merged(ctx, params, base[start:stop].bfloat16(), [m[start:stop].bfloat16() for m in models])
        assert torch.equal(_bits(stored), _bits(found[k][1]))
    assert ties_fused.merged(ctx, params, base[start:stop].half(), [m[start:stop].half() for m in models]) is None


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    """base, ft1, ft2 in bf16 with few-valued task vectors (ties at every threshold)."""
    import os

    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("bf16-family")
    shapes = {"model.embed_tokens.weight": (300, 64), "model.layers.0.mlp.up_proj.weight": (130, 48),
              "model.norm.weight": (5000,)}
    tensors = {name: _family(shape, 2, seed=len(name)) for name, shape in shapes.items()}
    paths = {}
    for k, label in enumerate(("base", "ft1", "ft2")):
        paths[label] = str(root / label)
        os.makedirs(paths[label])
        save_file({name: (b if k == 0 else ms[k - 1]).bfloat16() for name, (b, ms) in tensors.items()},
                  os.path.join(paths[label], "model.safetensors"))
    return paths


def test_bf16_merge_equals_the_torch_path_under_any_blocking(monkeypatch, tmp_path, bf16_family):
    """A TIES merge of bf16 checkpoints (statistics and kernel on the stored tiles, ties counted
    from the low pass's listing) equals the torch path's (fp32 copies, tie pass), whole and in
    blocks of a few rows, and with the listing off."""
    from tensorstore_llm import api
    from tensorstore_llm.ops import topk
    from tensorstore_llm.store import Store
    text = (f"merge_method: ties\nbase_model: {bf16_family['base']}\nmodels:\n"
            f"  - model: {bf16_family['ft1']}\n    parameters: {{weight: 0.6, density: 0.35}}\n"
            f"  - model: {bf16_family['ft2']}\n    parameters: {{weight: 0.4, density: 0.5}}\ndtype: bfloat16\n")
    results = []
    for label, compiled, budget, listed in (("compiled", True, "1G", topk.LISTED_BYTES), ("torch", False, "1G", 0),
                                            ("blocks", True, "24K", topk.LISTED_BYTES), ("no-list", True, "24K", 0)):
        monkeypatch.setattr(topk_kernels, "USE_NUMBA", compiled)
        monkeypatch.setattr(topk, "LISTED_BYTES", listed)
        store = Store(str(tmp_path / label))
        artifact = api.merge(store, text, progress=False, max_memory=budget).artifact
        with store.open(artifact.id) as reader:
            results.append({name: reader.read(name) for name in reader.keys()})
    for other in results[1:]:
        for name, tensor in results[0].items():
            assert torch.equal(tensor.view(torch.int16), other[name].view(torch.int16)), name
