"""mergekit's newer merge methods (multislerp, karcher, sce, nearswap, arcee_fusion, ram,
ramplus_tl): each op against a golden formula written step by step in float64 (the algorithm
as its paper / mergekit describes it, not our Gram-matrix shortcut; newer_method_goldens.py),
through the op conformance base (block sizes, job order, resume). The recipes, their checks and SCE's top-k against mergekit in test_newer_methods_recipes.py;
plain comparisons with mergekit in test_vs_mergekit.py.
"""
import math

import pytest
import torch

from tensorstore_llm.testing.conformance import OpConformance

from newer_method_goldens import (
    karcher_golden,
    multislerp_golden,
    ram_golden,
    sce_golden,
)

SHAPE = (48, 40)


def _randn(gen, shape=SHAPE, scale=1.0):
    return torch.randn(shape, generator=gen) * scale


def _sparse_delta(gen, shape=SHAPE):
    """A task vector of scale 0.01 with about half of its entries exactly 0."""
    return _randn(gen, shape, 0.01) * (torch.rand(shape, generator=gen) < 0.5)


# -- the ops through the conformance base ------------------------------------------------------

class TestMultiSlerp(OpConformance):
    cuda_exact = False   # reductions (sums, norms, softmax, sort) may add in another order on a GPU; not checked on one yet
    op = "multislerp"
    params = {"weights": [1.0, 2.0, 0.5]}
    atol = 2e-6

    def make_inputs(self, gen):
        return {"models": [_randn(gen) for _ in range(3)]}

    def golden(self, inputs, params):
        return multislerp_golden(inputs["models"], params["weights"])


class TestMultiSlerpDelta(OpConformance):
    cuda_exact = False   # reductions (sums, norms, softmax, sort) may add in another order on a GPU; not checked on one yet
    op = "multislerp_delta"
    params = {"weights": [0.7, 0.4], "normalize_weights": False}
    atol = 1e-6

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "models": [base + _randn(gen, scale=0.01) for _ in range(2)]}

    def golden(self, inputs, params):
        base = inputs["base"].double()
        return base + multislerp_golden([m - inputs["base"] for m in inputs["models"]], params["weights"], normalize=False)


class TestKarcher(OpConformance):
    cuda_exact = False   # reductions (sums, norms, softmax, sort) may add in another order on a GPU; not checked on one yet
    op = "karcher"
    params = {"max_iter": 20, "tol": 1e-9}
    atol = 1e-6

    def make_inputs(self, gen):
        return {"models": [_randn(gen) for _ in range(3)]}

    def golden(self, inputs, params):
        return karcher_golden(inputs["models"], params["max_iter"], params["tol"])


class TestSce(OpConformance):
    cuda_exact = False   # reductions (sums, norms, softmax, sort) may add in another order on a GPU; not checked on one yet
    op = "sce"
    params = {"select_topk": 0.4}
    atol = 1e-6

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "models": [base + _randn(gen, scale=0.01) for _ in range(3)]}

    def golden(self, inputs, params):
        return sce_golden(inputs["base"], inputs["models"], params["select_topk"])


class TestSceKeepsAll(TestSce):
    params = {}

    def golden(self, inputs, params):
        return sce_golden(inputs["base"], inputs["models"], 1.0)


class TestSceTiedVariances(TestSce):
    """Task vectors on a coarse grid: the variances take a few values, so the top-k cut falls
    inside a run of tied entries that spans rows and blocks (the tie-count pass decides)."""

    params = {"select_topk": 0.35}

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "models": [base + torch.randint(-3, 4, SHAPE, generator=gen) / 256 for _ in range(3)]}

    def golden(self, inputs, params):
        base, models = inputs["base"], inputs["models"]
        variance = torch.var(torch.stack([m - base for m in models]), dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(variance)) * params["select_topk"])
        cut = variance.reshape(-1).sort(descending=True).values[k - 1]
        assert k < int((variance >= cut).sum()) and int((variance > cut).sum()) < k   # a tie straddles the cut
        # the kept set from the fp32 variances the op ranks (fp64 ones would break the ties),
        # ordered by (variance descending, flat index ascending)
        flat = variance.reshape(-1).tolist()
        keep = torch.zeros(len(flat))
        keep[sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k]] = 1
        return sce_golden(base, models, params["select_topk"], keep.reshape(variance.shape))


class TestSce1D(TestSce):
    """A 1-D tensor (a norm): its rows are single entries, the top-k and the energies span it."""

    params = {"select_topk": 0.5}
    small_budget = "8K"

    def make_inputs(self, gen):
        base = _randn(gen, (3000,))
        return {"base": base, "models": [base + _randn(gen, (3000,), 0.01) for _ in range(2)]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_sce_variance_is_torch_var_bit_for_bit(dtype, n):
    """SCE's variance (Welford in float64) equals torch.var over the model axis, the value
    mergekit ranks, including values tied on a coarse grid."""
    from tensorstore_llm.ops.sce_fusion import _variance

    gen = torch.Generator().manual_seed(n)
    taus = torch.cat([torch.randn(n, 64, 96, generator=gen) * 0.01,
                      torch.randint(-3, 4, (n, 64, 96), generator=gen) / 256]).reshape(2 * n, 64, 96)[:n].to(dtype)
    grid = (torch.randint(-3, 4, (n, 32, 96), generator=gen) / 256).to(dtype)
    for x in (taus, grid):
        assert torch.equal(_variance(x).view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           torch.var(x, dim=0, unbiased=False).view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


class TestNearSwap(OpConformance):
    op = "nearswap"
    params = {"t": 0.004}

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "model": base + _randn(gen, scale=0.01)}

    def golden(self, inputs, params):
        a, b = inputs["base"], inputs["model"]
        distance = (a - b).abs()
        weight = torch.where(distance <= 1e-6, params["t"] / 1e-6, params["t"] / distance).clamp(0, 1)
        return weight * b + (1 - weight) * a


class TestArceeFusion(OpConformance):
    cuda_exact = False   # reductions (sums, norms, softmax, sort) may add in another order on a GPU; not checked on one yet
    op = "arcee_fusion"
    atol = 1e-6

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "model": base + _randn(gen, scale=0.3)}

    def golden(self, inputs, params):
        base, model = inputs["base"].double(), inputs["model"].double()
        p, q = torch.softmax(model, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
        importance = (model - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
        ordered = sorted(importance.reshape(-1).tolist())
        q1, median, q3 = (ordered[math.floor(q * (len(ordered) - 1))] for q in (0.25, 0.5, 0.75))
        keep = importance >= median + 1.5 * (q3 - q1)
        assert 0 < int(keep.sum()) < keep.numel()
        return torch.where(keep, model, base)


class TestArceeFusion1D(TestArceeFusion):
    """A 1-D tensor: one softmax over all of it (gathered in a pass when the tensor is split)."""

    params = {"whole_tensor_kl": True}
    small_budget = "16K"

    def make_inputs(self, gen):
        base = _randn(gen, (3000,))
        return {"base": base, "model": base + _randn(gen, (3000,), 0.3)}


def test_arcee_fusion_1d_split_without_its_gather_pass_is_an_error():
    from tensorstore_llm.errors import OpError
    from tensorstore_llm.ops.registry import OpContext, get_op

    spec = get_op("arcee_fusion")
    x = torch.randn(100)
    ctx = OpContext("arcee_fusion", "norm", (100,), 0, 50, 0, stats={"quantiles": [0.0, 0.0, 0.0]})
    with pytest.raises(OpError, match="whole_tensor_kl"):
        spec.fn(ctx, spec.make_params({}, "t"), base=x[:50], model=x[:50] + 1)


class TestRam(OpConformance):
    cuda_exact = False   # reductions (sums, norms, softmax, sort) may add in another order on a GPU; not checked on one yet
    op = "ram"
    params = {"epsilon": 0.004}
    atol = 1e-6

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "models": [base + _sparse_delta(gen) for _ in range(3)]}

    def golden(self, inputs, params):
        return ram_golden(inputs["base"], inputs["models"], params["epsilon"])


class TestRamPlus(TestRam):
    op = "ramplus_tl"
    params = {"epsilon": 0.004, "r": 0.5, "alpha": 0.8}

    def golden(self, inputs, params):
        return ram_golden(inputs["base"], inputs["models"], params["epsilon"], params["r"], params["alpha"])


# -- coefficients and edge cases ---------------------------------------------------------------

def test_multislerp_of_antipodal_pair_is_linear_and_of_three_is_refused():
    from tensorstore_llm.ops.newer_merges import (
        MultiSlerpParams,
        multislerp_coefficients,
    )

    g = [[4.0, -4.0], [-4.0, 4.0]]                        # x and -x
    assert multislerp_coefficients(MultiSlerpParams((1.0, 1.0)), g) == [0.5, 0.5]
    g3 = [[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="zero"):
        multislerp_coefficients(MultiSlerpParams((1.0, 1.0, 0.0)), g3, "w")


def test_karcher_of_identical_directions_is_their_mean_norm_and_zeros_stay_zero():
    from tensorstore_llm.ops.newer_merges import KarcherParams, karcher_coefficients

    x = torch.randn(50, dtype=torch.float64)
    xs = [x, 3 * x]
    g = [[float(a @ b) for b in xs] for a in xs]
    c = karcher_coefficients(KarcherParams(), g)
    assert torch.allclose(c[0] * xs[0] + c[1] * xs[1], 2 * x)
    assert karcher_coefficients(KarcherParams(), [[0.0, 0.0], [0.0, 0.0]]) == [0.0, 0.0]
