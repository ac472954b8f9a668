"""Recipe fuzzer (beside the safetensors one): arbitrary YAML documents — recipe-shaped ones with
random values, anchors and aliases, tags, deep nesting, huge scalars, and plain random text — give
either a plan or a RecipeError, never another exception, and never expand beyond their size."""
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorstore_llm.engine.plan import Plan
from tensorstore_llm.errors import RecipeError
from tensorstore_llm.io.hf_dir import HFCheckpointSource
from tensorstore_llm.merge.recipe import KNOWN_PARAMS, MAX_RECIPE_BYTES, METHODS, MergeRecipe, load_recipe, plan_merge

REFS = ("base", "ft1", "ft2")
PARAMS = sorted(set().union(*KNOWN_PARAMS.values()))


@pytest.fixture(scope="module")
def sources(tiny_family):
    opened = {ref: HFCheckpointSource(tiny_family[ref]) for ref in REFS}
    yield opened
    for source in opened.values():
        source.close()


_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
            | st.sampled_from([*REFS, "*", "mlp", "self_attn", "inverse", "l1", "bfloat16", "int8", 0.5, 0, 1, -5]))
_values = st.recursive(
    _scalars,
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.sampled_from(["filter", "value", "model", "parameters", *PARAMS])
                                        | st.text(max_size=4), children, max_size=3)),
    max_leaves=12)
_params = st.dictionaries(st.sampled_from(PARAMS) | st.text(max_size=4), _values, max_size=5)
_model = (st.sampled_from(REFS) | st.fixed_dictionaries({"model": st.sampled_from(REFS)}, optional={"parameters": _params})
          | _values)
_recipe = st.fixed_dictionaries({}, optional={
    "merge_method": st.sampled_from([*METHODS, "frankenmerge"]) | _values,
    "base_model": st.sampled_from(REFS) | _values,
    "models": st.lists(_model, max_size=4) | _values,
    "parameters": _params | _values,
    "dtype": st.sampled_from(["bfloat16", "float16", "float32", "int8", "float7"]) | _values,
    "out_dtype": st.sampled_from(["float32", "int32"]),
    "tokenizer_source": st.sampled_from(["base", "union"]),
    "name": _values,
    "slices": _values,
})

# Close to valid recipes, so that many reach plan_merge: in-range numbers, gradients, filters.
_number = st.floats(-0.2, 1.2) | st.integers(-1, 2)
_setting = (_number | st.lists(_number, min_size=1, max_size=4)
            | st.lists(st.fixed_dictionaries({"value": _number},
                                             optional={"filter": st.sampled_from(["mlp", "self_attn", "*", "norm"])}),
                       min_size=1, max_size=3))
_global = {"normalize": st.booleans(), "rescale": st.booleans(), "rescale_method": st.sampled_from(["inverse", "l1"]),
           "lambda": _setting, "t": _setting, "temperature": _setting, "sigma": _number, "int8_mask": st.booleans(),
           "expert": st.sampled_from(REFS), "filter_wise": st.booleans()}
_plausible = st.fixed_dictionaries({
    "merge_method": st.sampled_from(METHODS),
    "base_model": st.sampled_from(["base", "base", "base", "ft1"]),
    "models": st.lists(st.fixed_dictionaries({"model": st.sampled_from(["ft1", "ft2"]), "parameters": st.fixed_dictionaries(
        {"weight": _setting}, optional={k: _setting for k in ("density", "gamma", "epsilon")})}),
        min_size=1, max_size=2, unique_by=lambda m: m["model"]),
}, optional={"parameters": st.fixed_dictionaries({}, optional=_global),
             "dtype": st.sampled_from(["bfloat16", "float32"])})

# Fragments spliced into a dumped document as the value of a key.
_fragments = st.sampled_from([
    "&a [1, 2]", "*a", "&a 0.5", "{<<: *a}", "[&b x, *b, *b]",
    "!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!python/object:object {}",
    "!!binary aGk=", "!!set {a: null}", "!!timestamp 2001-12-14", "!!omap [a: 1]", "!!float .nan", "!!float -.inf",
    "!!int 0x7f", "!custom x", "!!str 5", "9" * 5000, "9" * 400, "1e400", "0b" + "1" * 300, "1:2:3:4:5:6",
    "'\\x00'", "\"\\ud800\"", "? [a]\n  : b", "---\n---", "%YAML 1.1", "|\n  multi\n  line", "\t", ".nan", ".inf",
])
_nesting = st.builds(lambda opener, closer, depth: opener * depth + "1" + closer * depth,
                     st.sampled_from(["[", "{a: "]), st.sampled_from(["]", "}"]), st.integers(1, 3000))


def _check(text, sources):
    """load_recipe (+ plan_merge when every reference is a model we have): a plan or a RecipeError."""
    try:
        recipe = load_recipe(text, "fuzz.yaml")
    except RecipeError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(recipe, MergeRecipe)
    size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text)
    assert size <= MAX_RECIPE_BYTES
    # no expansion: the parsed document is about as large as its text
    assert len(json.dumps(recipe.raw, default=str)) <= 8 * size + 64
    refs = [recipe.base] * (recipe.base is not None) + [m.ref for m in recipe.models]
    if not set(refs) <= set(sources):
        return   # api.merge would refuse it as ArtifactNotFound before planning
    try:
        plan = plan_merge(recipe, sources, "fuzz.yaml", averaged_layers=lambda key: True)
    except RecipeError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(plan, Plan) and plan.jobs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow, HealthCheck.data_too_large])
@given(doc=_recipe | _plausible)
def test_recipe_shaped_documents(sources, doc):
    _check(yaml.safe_dump(doc, allow_unicode=True), sources)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow, HealthCheck.data_too_large])
@given(doc=_recipe, key=st.sampled_from(["name", "merge_method", "base_model", "models", "parameters", "extra"]),
       fragment=_fragments | _nesting, prefix=st.booleans())
def test_documents_with_aliases_tags_and_nesting(sources, doc, key, fragment, prefix):
    doc.pop(key, None)
    body = yaml.safe_dump(doc, allow_unicode=True) if doc else ""
    line = f"{key}: {fragment}\n"
    _check(line + body if prefix else body + line, sources)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300) | st.binary(max_size=300))
def test_random_text(sources, text):
    _check(text, sources)


@pytest.mark.parametrize("size", [MAX_RECIPE_BYTES - 100, MAX_RECIPE_BYTES + 1, 8 * MAX_RECIPE_BYTES])
def test_huge_scalars(sources, size):
    _check("merge_method: linear\nmodels: [base]\nparameters: {weight: 1}\nname: " + "x" * size + "\n", sources)


def test_a_valid_recipe_plans(sources):
    recipe = load_recipe("merge_method: della\nbase_model: base\nmodels:\n"
                         "  - model: ft1\n    parameters: {weight: [0.2, 0.8], density: 0.5, epsilon: 0.1}\n"
                         "  - model: ft2\n    parameters: {weight: 1, density: [{filter: mlp, value: 0.3}, {value: 0.6}]}\n")
    plan = plan_merge(recipe, sources)
    assert len(plan.jobs) == len(list(sources["base"].keys()))
