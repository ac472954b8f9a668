"""mergekit's newer merge methods (multislerp, karcher, sce, nearswap, arcee_fusion, ram,
ramplus_tl): each op against a golden formula written here step by step in float64 (the
algorithm as its paper / mergekit describes it, not our Gram-matrix shortcut), through the op
conformance base (block sizes, job order, resume); then the recipes, their checks, and SCE's
top-k against mergekit. Plain comparisons with mergekit are in test_vs_mergekit.py.
"""
import math

import pytest
import torch

from tensorstore_llm import api
from tensorstore_llm.errors import RecipeError
from tensorstore_llm.testing.conformance import OpConformance

SHAPE = (48, 40)


def _randn(gen, shape=SHAPE, scale=1.0):
    return torch.randn(shape, generator=gen) * scale


def _sparse_delta(gen, shape=SHAPE):
    """A task vector of scale 0.01 with about half of its entries exactly 0."""
    return _randn(gen, shape, 0.01) * (torch.rand(shape, generator=gen) < 0.5)


# -- golden formulas ---------------------------------------------------------------------------

def multislerp_golden(xs, weights, normalize=True, eps=1e-8):
    """Goddard's Multi-SLERP spelled out: unit vectors, weighted mean direction, tangent vectors at
    it, their weighted sum mapped back by the exponential map, times the weighted mean norm."""
    flat = [x.double().reshape(-1) for x in xs]
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum() if normalize else w
    norms = torch.stack([f.norm() for f in flat])
    units = [f / (n + eps) for f, n in zip(flat, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
    length = tangent.norm() + eps
    point = mean * torch.cos(length) + tangent * torch.sin(length) / length
    return (point * (norms * w).sum()).reshape(xs[0].shape)


def karcher_golden(xs, max_iter=10, tol=1e-5):
    """The Karcher mean on the sphere by the textbook fixed point: m <- exp_m(mean of log_m(u_i))."""
    flat = [x.double().reshape(-1) for x in xs]
    norms = [f.norm() for f in flat]
    units = [f / n for f, n in zip(flat, norms)]
    mean = sum(units) / len(units)
    mean = mean / mean.norm()
    for _ in range(max_iter):
        logs = []
        for u in units:
            cos = torch.clamp(u @ mean, -1, 1)
            theta = torch.arccos(cos)
            logs.append(torch.zeros_like(u) if theta < tol else theta / torch.sin(theta) * (u - cos * mean))
        step = sum(logs) / len(units)
        size = step.norm()
        if size < tol:
            break
        mean = torch.cos(size) * mean + torch.sin(size) * step / size
        mean = mean / mean.norm()
    return (mean * (sum(norms) / len(norms))).reshape(xs[0].shape)


def sce_golden(base, models, select_topk, keep=None):
    """SCE spelled out; ``keep`` (a 0/1 mask) replaces the top-k selection when given."""
    base = base.double()
    taus = [m.double() - base for m in models]
    if keep is not None:
        taus = [t * keep.double() for t in taus]
    elif select_topk < 1:
        stacked = torch.stack(taus)
        variance = ((stacked - stacked.mean(0)) ** 2).mean(0).reshape(-1)
        k = int(int((variance != 0).sum()) * select_topk)
        keep = torch.zeros_like(variance)
        keep[sorted(range(variance.numel()), key=lambda i: (-float(variance[i]), i))[:k]] = 1
        taus = [t * keep.reshape(base.shape) for t in taus]
    energy = torch.tensor([float((t ** 2).mean()) for t in taus], dtype=torch.float64)
    weights = energy / energy.sum() if abs(float(energy.sum())) >= 1e-6 else torch.full_like(energy, 1 / len(taus))
    majority = torch.where(sum(taus) >= 0, 1.0, -1.0).double()
    numerator = torch.zeros_like(base)
    denominator = torch.zeros_like(base)
    for w, t in zip(weights, taus):
        agrees = (torch.sign(t) == majority).double()
        numerator += w * agrees * t
        denominator += w * agrees
    return base + numerator / denominator.clamp(min=1e-6)


def ram_golden(base, models, epsilon, r=None, alpha=None):
    """RAM: per entry the mean of the task vectors with |τ| > epsilon (one alone: itself); RAM+
    scales each model's alone-entries by 1 + r·clamp(shared / alone, 0, alpha)."""
    base = base.double()
    taus = [m.double() - base for m in models]
    changed = [t.abs() > epsilon for t in taus]
    count = sum(c.double() for c in changed)
    out = base.clone()
    for t, c in zip(taus, changed):
        alone, shared = c & (count == 1), c & (count > 1)
        scale = 1.0
        if r is not None:
            rho = int(shared.sum()) / max(int(alone.sum()), epsilon)
            scale = 1 + r * min(max(rho, 0.0), alpha)
        out += torch.where(alone, t * scale, 0.0) + torch.where(shared, t / count.clamp(min=1), 0.0)
    return out


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
    from tensorstore_llm.ops.newer_merges import MultiSlerpParams, multislerp_coefficients

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


# -- recipes -----------------------------------------------------------------------------------

def _recipe(method, family, models=("ft1", "ft2"), base=True, params="", per_model=""):
    entries = "".join(f"  - model: {family[m]}\n" + (f"    parameters: {{{per_model}}}\n" if per_model else "") for m in models)
    return (f"merge_method: {method}\n" + (f"base_model: {family['base']}\n" if base else "") + "models:\n" + entries
            + (f"parameters: {{{params}}}\n" if params else "") + "dtype: float32\nout_dtype: float32\n")


def test_recipes_merge_and_stream_within_the_budget(store, tiny_family):
    from tensorstore_llm.io.hf_dir import HFCheckpointSource

    cases = {"multislerp": ("weight: 1.0", ""), "karcher": ("", "max_iter: 5"), "ram": ("", "epsilon: 0.004"),
             "ramplus_tl": ("", "r: 0.3"), "nearswap": ("", "t: 0.003")}
    name = "model.layers.0.mlp.up_proj.weight"
    with HFCheckpointSource(tiny_family["base"]) as b, HFCheckpointSource(tiny_family["ft1"]) as x, \
            HFCheckpointSource(tiny_family["ft2"]) as y:
        base, ft1, ft2 = b.read(name), x.read(name), y.read(name)
    for method, (per_model, params) in cases.items():
        models = ("ft1",) if method == "nearswap" else ("ft1", "ft2")
        text = _recipe(method, tiny_family, models, base=method != "multislerp", params=params, per_model=per_model)
        result = api.merge(store, text, progress=False, max_memory="24K")
        assert max(j.blocks for j in result.estimate.jobs) > 1, method     # streamed in row blocks
        with store.open(result.artifact.id) as out:
            merged = out.read(name).double()
        if method == "multislerp":
            expected = multislerp_golden([ft1, ft2], [1.0, 1.0])
        elif method == "karcher":
            expected = karcher_golden([base, ft1, ft2], max_iter=5)     # the base counts as one more model
        elif method == "nearswap":
            d = (base.double() - ft1.double()).abs()
            w = (0.003 / d.clamp(min=1e-6)).clamp(0, 1)
            expected = w * ft1.double() + (1 - w) * base.double()
        else:
            expected = ram_golden(base, [ft1, ft2], 0.004 if method == "ram" else 1e-5, *((0.3, 0.2) if method != "ram" else ()))
        assert torch.allclose(merged, expected, atol=1e-6, rtol=0), (method, (merged - expected).abs().max())


def test_a_single_model_is_copied(store, tiny_family):
    from tensorstore_llm.io.hf_dir import HFCheckpointSource

    for method in ("multislerp", "karcher"):
        text = _recipe(method, tiny_family, ("ft1",), base=False, per_model="weight: 1.0" if method == "multislerp" else "")
        art = api.merge(store, text, progress=False).artifact
        with store.open(art.id) as out, HFCheckpointSource(tiny_family["ft1"]) as ft1:
            for name in out.keys():
                assert torch.equal(out.read(name), ft1.read(name).float()), (method, name)


@pytest.mark.parametrize("method, models, base, params, message", [
    ("nearswap", ("ft1", "ft2"), True, "t: 0.001", "exactly one other model"),
    ("nearswap", ("ft1",), True, "", "needs parameter 't'"),
    ("nearswap", ("ft1",), True, "t: -0.5", "t must be a finite number >= 0, got -0.5"),
    ("slerp", ("ft1",), True, "t: 2", "t must be a number in \\[0, 1\\], got 2"),
    ("arcee_fusion", ("ft1",), False, "", "needs base_model"),
    ("sce", ("ft1", "ft2"), False, "", "needs base_model"),
    ("sce", ("ft1", "ft2"), True, "select_topk: 1.5", "select_topk must be a number in"),
    ("ram", ("ft1", "ft2"), True, "epsilon: -1", "epsilon must be"),
    ("ramplus_tl", ("ft1", "ft2"), True, "r: fast", "r must be a finite number"),
    ("karcher", ("ft1", "ft2"), False, "max_iter: 2.5", "max_iter must be an integer"),
    ("multislerp", ("ft1", "ft2"), False, "", "needs parameter 'weight'"),
    ("multislerp", ("ft1", "ft2"), False, "eps: -1, weight: 1", "eps must be"),
])
def test_bad_recipes_are_refused_before_any_work(store, tiny_family, method, models, base, params, message):
    text = _recipe(method, tiny_family, models, base=base, params=params)
    with pytest.raises(RecipeError, match=message):
        api.merge(store, text, progress=False)
    assert not store.list()


def test_nearswap_takes_any_distance_t_as_mergekit(store, tiny_family):
    """nearswap's t is a distance, so t > 1 is valid (mergekit takes any t); slerp's t stays a
    fraction in [0, 1] (refused above): each method has its own domain for the name."""
    from tensorstore_llm.io.hf_dir import HFCheckpointSource
    from tensorstore_llm.merge.recipe import PARAMETER_DOMAINS

    assert PARAMETER_DOMAINS[("nearswap", "t")].text != PARAMETER_DOMAINS[("slerp", "t")].text
    name = "model.layers.0.mlp.up_proj.weight"
    with HFCheckpointSource(tiny_family["base"]) as b, HFCheckpointSource(tiny_family["ft1"]) as x:
        base, ft1 = b.read(name).double(), x.read(name).double()
    distance = (base - ft1).abs()
    t = float(distance.flatten().kthvalue(distance.numel() // 2).values) * 2 + 1.0   # > 1: beyond slerp's domain
    for value in (t, 0.0):
        art = api.merge(store, _recipe("nearswap", tiny_family, ("ft1",), params=f"t: {value!r}"), progress=False).artifact
        with store.open(art.id) as out:
            merged = out.read(name).double()
        w = (value / distance.clamp(min=1e-6)).clamp(0, 1)
        assert torch.allclose(merged, w * ft1 + (1 - w) * base, atol=1e-6, rtol=0), value
    assert torch.equal(merged, base)    # t = 0: every entry keeps the base


def test_sce_top_k_matches_mergekit_except_at_variance_ties(tmp_path, store, tiny_family):
    """mergekit keeps its top-k by torch.topk (ties in any order); ours by flat index. Tensors
    whose cut has no tie straddling it must match to fp32 rounding; in the others the kept sets
    differ only in tied entries, and each result is SCE's formula with its own kept set."""
    pytest.importorskip("mergekit", reason="mergekit is not installed")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from mergekit.merge_methods.sce import sce_mask
    from safetensors.torch import load_file

    from tensorstore_llm.io.hf_dir import HFCheckpointSource

    text = _recipe("sce", tiny_family, params="select_topk: 0.3")
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mk"),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    theirs = {}
    for f in (tmp_path / "mk").glob("*.safetensors"):
        theirs.update(load_file(str(f)))
    art = api.merge(store, text, progress=False).artifact
    agreeing = 0
    with store.open(art.id) as ours, HFCheckpointSource(tiny_family["base"]) as b, \
            HFCheckpointSource(tiny_family["ft1"]) as x, HFCheckpointSource(tiny_family["ft2"]) as y:
        assert sorted(ours.keys()) == sorted(theirs)
        for name in ours.keys():
            base, models = b.read(name).float(), [x.read(name).float(), y.read(name).float()]
            taus = torch.stack([m - base for m in models])
            variance = torch.var(taus, dim=0, unbiased=False)
            k = int(int(torch.count_nonzero(variance)) * 0.3)
            cut = variance.reshape(-1).sort(descending=True).values[k - 1]
            if int((variance >= cut).sum()) == k:      # no tie straddles the cut: one kept set
                agreeing += 1
                assert torch.allclose(ours.read(name), theirs[name], atol=1e-6, rtol=0), name
                continue
            their_keep = sce_mask(taus, 0.3, torch.float32)
            our_keep = ((variance > cut) | ((variance == cut).reshape(-1).cumsum(0).reshape(variance.shape)
                                            <= k - int((variance > cut).sum())) & (variance == cut)).float()
            assert ((their_keep != our_keep) <= (variance == cut)).all(), name          # only tied entries differ
            assert torch.allclose(ours.read(name).double(), sce_golden(base, models, 0.3, our_keep), atol=1e-6), name
            assert torch.allclose(theirs[name].double(), sce_golden(base, models, 0.3, their_keep), atol=1e-6), name
    assert agreeing >= 3


def test_ram_threshold_is_any_magnitude_as_in_mergekit(store, tmp_path):
    """RAM's epsilon is a |τ| threshold, not DELLA's fraction: 0.7 (beyond DELLA's [0, 0.5)) is
    taken and means what the formula says; a negative one is still refused (above)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    base = torch.randn(48, 32, generator=g)
    tensors = {"base": base, "ft1": base + torch.randn(48, 32, generator=g), "ft2": base + torch.randn(48, 32, generator=g)}
    family = {}
    for key, value in tensors.items():
        (tmp_path / key).mkdir()
        save_file({"w": value}, str(tmp_path / key / "model.safetensors"))
        family[key] = str(tmp_path / key)
    art = api.merge(store, _recipe("ram", family, params="epsilon: 0.7"), progress=False).artifact
    with store.open(art.id) as out:
        merged = out.read("w")
    changed = (tensors["ft1"] - base).abs() > 0.7
    assert 0.2 < float(changed.float().mean()) < 0.8      # the threshold splits the entries
    torch.testing.assert_close(merged.double(), ram_golden(base, [tensors["ft1"], tensors["ft2"]], 0.7), atol=1e-6, rtol=0)
