"""Recipes of mergekit's newer merge methods (multislerp, karcher, sce, nearswap, ram, ramplus_tl):
merged and streamed within the budget against the float64 goldens of newer_method_goldens.py,
refused before any work when malformed, and SCE's top-k / RAM's threshold / NearSwap's t as
mergekit reads them (the ops themselves are in test_newer_methods.py).
"""
import pytest
import torch

from tensorstore_llm import api
from tensorstore_llm.errors import RecipeError

from newer_method_goldens import (
    karcher_golden,
    multislerp_golden,
    ram_golden,
    sce_golden,
)


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
