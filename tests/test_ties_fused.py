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
