"""Merge methods are objects in a registry: the built-ins in their documented order, and a new
method added as one small class runs through recipes, the API and the engine like a built-in."""
import pytest
import torch

from tensorstore_llm import api
from tensorstore_llm.engine.plan import InputRef
from tensorstore_llm.errors import RecipeError
from tensorstore_llm.io.hf_dir import HFCheckpointSource
from tensorstore_llm.merge import methods
from tensorstore_llm.merge.methods.base import REAL, WEIGHT, Domain, JobSpec, MergeMethod, Param
from tensorstore_llm.merge.recipe import KNOWN_PARAMS, METHODS, load_recipe

NAME = "model.layers.1.mlp.down_proj.weight"


class Extrapolate(MergeMethod):
    """θ0 + λ·(θ1 − θ0): one model pushed along its task vector (λ > 1 extrapolates)."""

    name = "test_extrapolate"
    parameters = {"lambda": Param(REAL)}

    def check(self, recipe, where):
        super().check(recipe, where)
        if len(recipe.models) != 1:
            raise RecipeError(f"{where}: {self.name} takes exactly one model besides base_model")

    def job(self, recipe, tensor, state):
        return JobSpec("task_arithmetic", (("base", InputRef(tensor.base, tensor.name)),
                                           ("models", (InputRef(tensor.others[0].ref, tensor.name),))),
                       {"weights": [1.0], "lam": tensor.value("lambda")})


@pytest.fixture
def extrapolate():
    method = Extrapolate()
    methods.register_method(method)
    yield method
    methods._REGISTRY.pop(method.name, None)


def test_builtins_in_documented_order():
    assert METHODS[:6] == ("linear", "slerp", "nuslerp", "model_stock", "sens_merging", "mediator")
    assert set(METHODS[6:]) == {"task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                                "breadcrumbs_ties", "della", "della_linear", "passthrough", "lore", "aim", "twin",
                                "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"}
    for name in METHODS:
        method = methods.get_method(name)
        assert isinstance(method, MergeMethod) and method.name == name
        assert set(method.parameters) == KNOWN_PARAMS[name]
        assert all(isinstance(p, Param) for p in method.parameters.values())
    assert methods.get_method("ties").preset.sparsification == "magnitude"
    with pytest.raises(RecipeError, match="frankenmerge.*not supported; supported: linear"):
        methods.get_method("frankenmerge")


def test_a_new_method_is_one_class(store, tiny_family, extrapolate, tmp_path):
    recipe = (f"merge_method: test_extrapolate\nbase_model: {tiny_family['base']}\nmodels:\n"
              f"  - model: {tiny_family['ft1']}\nparameters:\n  lambda: [{{filter: mlp, value: 1.5}}, {{value: 1.0}}]\n")
    result = api.merge(store, recipe, progress=False, max_memory="16K")
    with HFCheckpointSource(tiny_family["base"]) as b, HFCheckpointSource(tiny_family["ft1"]) as f, \
            store.open(result.artifact.id) as out:
        for name in (NAME, "model.layers.0.self_attn.q_proj.weight"):
            lam = 1.5 if ".mlp." in name else 1.0
            stored = b.read(name)
            base, delta = stored.float(), f.read(name).float() - stored.float()
            expected = ((delta * lam if lam != 1 else delta) + base).to(stored.dtype)   # the kernel's fp32 order
            assert torch.equal(out.read(name), expected), name
    assert result.artifact.manifest.recipe["merge_method"] == "test_extrapolate"


def test_a_new_method_is_checked_like_a_builtin(extrapolate):
    with pytest.raises(RecipeError, match="exactly one model"):
        load_recipe("merge_method: test_extrapolate\nbase_model: a\nmodels: [b, c]\nparameters: {lambda: 1}")
    from tensorstore_llm.errors import RecipeWarning
    with pytest.warns(RecipeWarning, match="'density' is not used by test_extrapolate"):   # mergekit ignores it too
        load_recipe("merge_method: test_extrapolate\nbase_model: a\nmodels: [b]\nparameters: {lambda: 1, density: 0.5}")
    with pytest.raises(RecipeError, match="'densty' is not used by test_extrapolate"):      # known to no method
        load_recipe("merge_method: test_extrapolate\nbase_model: a\nmodels: [b]\nparameters: {lambda: 1, densty: 0.5}")
    with pytest.raises(RecipeError, match="lambda must be a finite number"):
        load_recipe("merge_method: test_extrapolate\nbase_model: a\nmodels: [b]\nparameters: {lambda: yes}")


def test_registry_refuses_silent_overrides_and_keeps_domains_per_method(extrapolate):
    with pytest.raises(RecipeError, match="already registered"):
        methods.register_method(Extrapolate())
    methods.register_method(Extrapolate(), clobber=True)

    class OddWeight(Extrapolate):
        name = "test_odd_weight"
        parameters = {"weight": Param(Domain("an odd integer", lambda v: isinstance(v, int) and v % 2 == 1), per_model=True)}

    methods.register_method(OddWeight())    # a name may have another domain in another method (slerp / nearswap t)
    try:
        with pytest.raises(RecipeError, match="weight must be an odd integer, got 0.5"):
            load_recipe("merge_method: test_odd_weight\nbase_model: a\nmodels: [{model: b, parameters: {weight: 0.5}}]")
        load_recipe("merge_method: test_odd_weight\nbase_model: a\nmodels: [{model: b, parameters: {weight: 3}}]")
        load_recipe("merge_method: linear\nmodels: [{model: a, parameters: {weight: 0.5}}, b]\nparameters: {weight: 1}")
    finally:
        methods._REGISTRY.pop("test_odd_weight", None)
    assert WEIGHT.per_model and methods.get_method("linear").parameters["weight"] is WEIGHT
