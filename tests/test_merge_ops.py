"""Merge kernels against direct formulas written here, and their blocking independence."""
import math

import pytest
import torch

from tensorstore_llm import api
from tensorstore_llm.engine import plan_map
from tensorstore_llm.io.hf_dir import HFCheckpointSource
from tensorstore_llm.store import Store


def _run(tmp_path, family, op, roles, params, budget="1G", seed=0, label="s"):
    sources = {k: HFCheckpointSource(family[k]) for k in ("base", "ft1", "ft2")}
    plan = plan_map(op, sources, roles, params=params, dtype="float32")
    store = Store(str(tmp_path / f"{label}-{budget}"))
    art = api.run_plan(store, plan, kind="checkpoint", max_memory=budget, seed=seed, progress=False).artifact
    return store, art, sources


def _direct_ties(base, models, weights, densities, normalize=True, lam=1.0):
    """TIES written from the paper: keep the k largest |τ| (ties by flat index), elect by Σ wτ,
    disjoint mean."""
    trimmed = []
    for m, w, d in zip(models, weights, densities):
        tau = m - base
        k = max(1, int(d * tau.numel()))
        keep = torch.zeros(tau.numel(), dtype=torch.bool)
        keep[torch.sort(tau.abs().reshape(-1), descending=True, stable=True).indices[:k]] = True
        trimmed.append(tau * keep.reshape(tau.shape) * w)
    elected = torch.where(sum(trimmed) >= 0, 1.0, -1.0)
    agree = [torch.sign(t) == elected for t in trimmed]
    mixed = sum(t * a for t, a in zip(trimmed, agree))
    divisor = sum(a * w for a, w in zip(agree, weights))
    divisor[divisor == 0] = 1
    return base + (mixed / divisor if normalize else mixed) * lam


def _read_all(store, art, src_names, sources):
    with store.open(art.id) as out:
        for name in out.keys():
            yield name, out.read(name), [sources[k].read(name).float() for k in src_names]


ROLES = {"base": "base", "models": ["ft1", "ft2"]}


def test_task_arithmetic_formula(tmp_path, tiny_family):
    store, art, sources = _run(tmp_path, tiny_family, "task_arithmetic", ROLES, {"weights": [0.7, 0.4], "lam": 0.9})
    for name, got, (b, x, y) in _read_all(store, art, ("base", "ft1", "ft2"), sources):
        expected = b + (((x - b) * 0.7) + ((y - b) * 0.4)) * 0.9
        assert torch.allclose(got, expected, atol=1e-7, rtol=0), name


def test_ties_formula_and_blocking(tmp_path, tiny_family):
    params = {"weights": [1.0, 0.5], "densities": [0.3, 0.6], "sparsification": "magnitude",
              "consensus": "sum", "normalize": True}
    store, art, sources = _run(tmp_path, tiny_family, "task_arithmetic", ROLES, params)
    for name, got, (b, x, y) in _read_all(store, art, ("base", "ft1", "ft2"), sources):
        expected = _direct_ties(b, [x, y], [1.0, 0.5], [0.3, 0.6])
        assert torch.allclose(got, expected, atol=1e-6, rtol=0), name
    _, blocked, _ = _run(tmp_path, tiny_family, "task_arithmetic", ROLES, params, budget="20K")
    assert blocked.manifest.tensors == art.manifest.tensors  # exact thresholds under row blocking


def test_dare_keeps_density_rescales_and_is_seeded(tmp_path, tiny_family):
    params = {"weights": [1.0, 1.0], "densities": [0.5, 0.5], "sparsification": "random", "rescale": True,
              "rescale_method": "inverse"}
    store, art, sources = _run(tmp_path, tiny_family, "task_arithmetic", ROLES, params)
    name = "model.embed_tokens.weight"
    with store.open(art.id) as out:
        got = out.read(name)
    b, x, y = (sources[k].read(name).float() for k in ("base", "ft1", "ft2"))
    diff = got - b
    # every entry is 2*(τ1 kept?) + 2*(τ2 kept?): recover the masks and check them
    k1 = torch.isclose(diff, 2 * (x - b), atol=1e-7) | torch.isclose(diff, 2 * (x - b) + 2 * (y - b), atol=1e-7)
    assert 0.47 < k1.float().mean().item() < 0.53
    assert torch.allclose(diff.mean(), ((x - b) + (y - b)).mean(), atol=5e-4)  # unbiased on average
    _, again, _ = _run(tmp_path, tiny_family, "task_arithmetic", ROLES, params, budget="20K", label="again")
    _, other_seed, _ = _run(tmp_path, tiny_family, "task_arithmetic", ROLES, params, seed=1, label="seed1")
    assert again.manifest.tensors == art.manifest.tensors
    assert other_seed.manifest.tensors != art.manifest.tensors


def test_dare_l1_rescale_restores_the_l1_norm(tmp_path, tiny_family):
    params = {"weights": [1.0, 0.0], "densities": [0.4, 1.0], "sparsification": "random", "rescale": True,
              "rescale_method": "l1"}
    store, art, sources = _run(tmp_path, tiny_family, "task_arithmetic", ROLES, params, budget="20K")
    for name, got, (b, x, _y) in _read_all(store, art, ("base", "ft1", "ft2"), sources):
        if got.numel() > 1000:
            assert math.isclose((got - b).abs().sum().item(), (x - b).abs().sum().item(), rel_tol=1e-4), name


def test_breadcrumbs_drops_both_ends(tmp_path, tiny_family):
    params = {"weights": [1.0, 0.0], "densities": [0.5, 1.0], "gammas": [0.1, 0.01], "sparsification": "magnitude_outliers"}
    store, art, sources = _run(tmp_path, tiny_family, "task_arithmetic", ROLES, params)
    _, blocked, _ = _run(tmp_path, tiny_family, "task_arithmetic", ROLES, params, budget="20K")
    assert blocked.manifest.tensors == art.manifest.tensors
    for name, got, (b, x, _y) in _read_all(store, art, ("base", "ft1", "ft2"), sources):
        tau = x - b
        n = tau.numel()
        target = int(0.5 * n)
        top_cut = n - max(0, n - target - int(0.1 * n)) - target
        # descending magnitude, ties by flat index: keep ranks [top_cut, top_cut + target)
        order = torch.sort(tau.abs().reshape(-1), descending=True, stable=True).indices
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order[top_cut:top_cut + target]] = True
        keep = keep.reshape(tau.shape)
        assert torch.allclose(got, b + tau * keep, atol=1e-7), name
        assert int(keep.sum()) == target


def test_slerp_formula_and_blocking(tmp_path, tiny_family):
    roles = {"a": "ft1", "b": "ft2"}
    store, art, sources = _run(tmp_path, tiny_family, "slerp", roles, {"t": 0.3})
    for name, got, (x, y) in _read_all(store, art, ("ft1", "ft2"), sources):
        xn, yn = x / x.norm(), y / y.norm()
        dot = (xn * yn).sum().clamp(-1, 1).double().item()
        if abs(dot) > 0.9995:
            expected = 0.7 * x + 0.3 * y
        else:
            theta = math.acos(dot)
            expected = x * (math.sin(0.7 * theta) / math.sin(theta)) + y * (math.sin(0.3 * theta) / math.sin(theta))
        assert torch.allclose(got, expected, atol=1e-6), name
    _, blocked, _ = _run(tmp_path, tiny_family, "slerp", roles, {"t": 0.3}, budget="16K")
    assert blocked.manifest.tensors == art.manifest.tensors


def test_della_rowwise_probabilities(tmp_path, tiny_family):
    params = {"weights": [1.0, 0.0], "densities": [0.5, 1.0], "epsilons": [0.4, 0.15], "sparsification": "della"}
    store, art, sources = _run(tmp_path, tiny_family, "task_arithmetic", ROLES, params)
    name = "model.layers.1.mlp.gate_proj.weight"
    with store.open(art.id) as out:
        kept = (out.read(name) - sources["base"].read(name).float()) != 0
    tau = (sources["ft1"].read(name).float() - sources["base"].read(name).float()).abs()
    big = tau >= tau.median(dim=1, keepdim=True).values
    assert kept[big].float().mean() > kept[~big].float().mean() + 0.3  # 0.7 vs 0.3 on average


def test_bad_params_fail_at_plan_time(tiny_family):
    from tensorstore_llm.errors import RecipeError

    sources = {k: HFCheckpointSource(tiny_family[k]) for k in ("base", "ft1", "ft2")}
    with pytest.raises(RecipeError, match="2 models but 3 weights"):
        plan_map("task_arithmetic", sources, ROLES, params={"weights": [1, 1, 1]})
    with pytest.raises(RecipeError, match="densities must be in"):
        plan_map("task_arithmetic", sources, ROLES, params={"weights": [1, 1], "densities": [1.5, 1]})
    with pytest.raises(RecipeError, match="epsilon"):
        plan_map("task_arithmetic", sources, ROLES, params={"weights": [1, 1], "densities": [0.1, 0.5], "sparsification": "della"})
    with pytest.raises(RecipeError, match="t must be"):
        plan_map("slerp", sources, {"a": "ft1", "b": "ft2"}, params={"t": 2})


def test_della_inverse_rescale_is_unbiased_per_entry(tmp_path, tiny_family):
    params = {"weights": [1.0, 0.0], "densities": [0.5, 1.0], "epsilons": [0.2, 0.15], "sparsification": "della",
              "rescale": True}
    store, art, sources = _run(tmp_path, tiny_family, "task_arithmetic", ROLES, params)
    name = "model.embed_tokens.weight"
    with store.open(art.id) as out:
        got = out.read(name) - sources["base"].read(name).float()
    tau = sources["ft1"].read(name).float() - sources["base"].read(name).float()
    kept = got != 0
    ranks = tau.abs().argsort(dim=1, stable=True).argsort(dim=1, stable=True).float()
    probs = 0.3 + ranks / (tau.shape[1] - 1) * 0.4
    assert torch.allclose(got[kept], (tau / probs)[kept], atol=1e-6)
    assert abs(got.sum().item() - tau.sum().item()) < 0.05 * tau.abs().sum().item()


def test_threshold_passes_hold_one_partial_not_one_per_tile(tmp_path, tiny_family, monkeypatch):
    """Histograms are folded as they arrive: memory must not grow with the number of tiles."""
    from tensorstore_llm.engine import executor

    monkeypatch.setattr(executor, "TILE_ELEMENTS_CPU", 256)  # many tiles per tensor
    seen = []
    original = executor.Executor._stats_block

    def spy(self, job, pass_index, *args):
        original(self, job, pass_index, *args)
        if pass_index < 2:
            seen.append(len(self._partials))

    monkeypatch.setattr(executor.Executor, "_stats_block", spy)
    params = {"weights": [1.0, 0.5], "densities": [0.3, 0.6], "sparsification": "magnitude", "consensus": "sum"}
    _run(tmp_path, tiny_family, "task_arithmetic", ROLES, params, budget="20K")
    assert seen and max(seen) <= 1


def test_model_stock_formula_and_blocking(tmp_path, tiny_family):
    store, art, sources = _run(tmp_path, tiny_family, "model_stock", ROLES, {})
    for name, got, (b, x, y) in _read_all(store, art, ("base", "ft1", "ft2"), sources):
        ox, oy = (x - b).reshape(-1).double(), (y - b).reshape(-1).double()
        cos = (ox @ oy / max(ox.norm() * oy.norm(), 1e-6)).clamp(-1, 1).item()
        t = 2 * cos / (1 + cos)
        expected = (x + y) / 2 * t + b * (1 - t)
        assert torch.allclose(got, expected, atol=1e-6), name
    _, blocked, _ = _run(tmp_path, tiny_family, "model_stock", ROLES, {}, budget="20K")
    assert blocked.manifest.tensors == art.manifest.tensors


@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_formula(tmp_path, tiny_family, with_base):
    roles = {"base": "base", "models": ["ft1", "ft2"]} if with_base else {"models": ["ft1", "ft2"]}
    op = "nuslerp_delta" if with_base else "nuslerp"
    store, art, sources = _run(tmp_path, tiny_family, op, roles, {"weights": [1.0, 3.0]})
    for name, got, (b, x, y) in _read_all(store, art, ("base", "ft1", "ft2"), sources):
        v0, v1 = ((x - b), (y - b)) if with_base else (x, y)
        dot = (v0.reshape(-1).double() @ v1.reshape(-1).double() / (v0.double().norm() * v1.double().norm())).clamp(-1, 1).item()
        theta = math.acos(dot)
        expected = (v0 * (math.sin(0.25 * theta) / math.sin(theta)) + v1 * (math.sin(0.75 * theta) / math.sin(theta)))
        expected = expected + b if with_base else expected
        assert torch.allclose(got, expected, atol=2e-6), name


@pytest.mark.parametrize("weights", [(1.0, 0.6, 0.8), (1.0, -0.5, 0.8)])
def test_ties_kernel_is_exact_on_ties_and_cancelling_votes(weights):
    """The kernel on hand-made values: magnitudes equal to the threshold are kept, a vote that
    cancels to +0 elects +, entries no model agrees on stay at the base; exact equality with
    the paper's formula (negative weights take the other divisor path)."""
    from tensorstore_llm.ops.merge import TaskArithmeticParams, task_arithmetic
    from tensorstore_llm.ops.registry import OpContext

    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 32, generator=g)
    taus = [torch.randn(64, 32, generator=g) * 0.01 for _ in weights]
    taus[1][0, :4] = -taus[0][0, :4] * weights[0] / weights[1]           # w0 τ0 + w1 τ1 == 0 there
    taus[2][0, :4] = 0.0
    taus[0][1, :8] = 0.0125                                               # ties at a threshold
    densities = (0.5, 0.7, 0.9)
    thresholds = {}
    for i, (t, d) in enumerate(zip(taus, densities)):
        k = max(1, int(d * t.numel()))
        thresholds[i] = [float(t.abs().reshape(-1).kthvalue(t.numel() - k + 1).values)]
    taus[0][1, :8] = thresholds[0][0]
    params = TaskArithmeticParams(weights=weights, densities=densities, sparsification="magnitude", consensus="sum", normalize=True)
    ctx = OpContext("task_arithmetic", "w", (64, 32), 0, 64, 0, "cpu", {"thresholds": thresholds})
    models = [base + t for t in taus]
    got = task_arithmetic(ctx, params, base, [m.clone() for m in models])
    trimmed = [(m - base) * ((m - base).abs() >= thresholds[i][0]) * w for i, (m, w) in enumerate(zip(models, weights))]
    elected = torch.where(sum(trimmed) >= 0, 1.0, -1.0)
    agree = [torch.sign(t) == elected for t in trimmed]
    divisor = sum(a * w for a, w in zip(agree, weights))
    divisor[divisor == 0] = 1
    expected = base + sum(t * a for t, a in zip(trimmed, agree)) / divisor
    assert torch.equal(got, expected)


def test_low_histogram_counts_exactly_the_entries_of_one_high_bin():
    from tensorstore_llm.ops import select

    x = torch.randn(100_000) * 0.01
    edges = torch.tensor([0x3C000000, 0x3C00FFFF, 0x3C010000, 0x3BFFFFFF, 0x00000000, 0x0000FFFF, 0x7FFFFFFF],
                         dtype=torch.int32).view(torch.float32)
    x = torch.cat([x, edges, -edges])            # bin edges on both sides, zero, a NaN pattern
    bits = x.abs().view(torch.int32)
    for high in {0, 0x3C00, 0x3BFF, int(bits[0]) >> 16, int(bits[500]) >> 16}:
        inside = bits[(bits >> 16) == high]
        expected = torch.bincount(inside & 0xFFFF, minlength=select.LO_BINS)
        assert torch.equal(select.low_histogram(x, high), expected), hex(high)
