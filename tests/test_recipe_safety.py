"""Hostile and out-of-domain recipes and options get one-line errors and the right exit code
(issue 8, items 3, 5, 6 and 11), before any work and without unbounded memory."""
import os
import resource
import time

import pytest

from tensorstore_llm import api
from tensorstore_llm.errors import InvalidParameter, RecipeError
from tensorstore_llm.merge.recipe import MAX_DEPTH, MAX_RECIPE_BYTES, PARAMETER_DOMAINS, load_recipe
from tensorstore_llm.store import Store


@pytest.fixture(scope="module")
def tagged(tmp_path_factory, tiny_family):
    """A real store holding the tiny family as tags base, ft1, ft2."""
    root = str(tmp_path_factory.mktemp("safety") / "store")
    store = Store(root)
    for name, path in tiny_family.items():
        api.import_checkpoint(path, store, name=name, progress=False)
    return root


def _one_line_error(code, out, err, expected_code, *needles):
    assert code == expected_code, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _artifacts(root):
    return sorted(os.listdir(os.path.join(root, "artifacts")))


def _merge(cli, tagged, tmp_path, text, *extra):
    path = tmp_path / "recipe.yaml"
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    before = _artifacts(tagged)
    result = cli("--store", tagged, "-q", "merge", path, *extra)
    if result[0] != 0:
        assert _artifacts(tagged) == before   # nothing committed by a refused recipe
    return result


TIES = ("merge_method: {method}\nbase_model: base\nmodels:\n"
        "  - model: ft1\n    parameters: {{weight: {w1}, density: 0.5{more}}}\n"
        "  - model: ft2\n    parameters: {{weight: 0.5, density: 0.5}}\n{extra}")


def _ties(method="ties", w1="1.0", more="", extra=""):
    return TIES.format(method=method, w1=w1, more=more, extra=extra)


# -- item 3: YAML alias bomb, size and depth ------------------------------------------------------

def _alias_bomb(levels=9):
    lines = ['a0: &a0 ["lolololololololololololololol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]")
    return lines, f"*a{levels - 1}"


def test_alias_bomb_in_name_is_refused_fast_and_small(cli, tagged, tmp_path):
    # 9^9 ~ 387M strings once expanded: the 586-byte recipe reached 2.5 GB and a MemoryError
    lines, _top = _alias_bomb()
    text = "\n".join(["name:"] + ["  " + line for line in lines]) + "\n" + _ties()
    assert len(text.encode()) < 2048
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    code, out, err = _merge(cli, tagged, tmp_path, text, "--name", "bomb")
    assert time.monotonic() - t0 < 10
    _one_line_error(code, out, err, 7, "anchors and aliases", "line 2")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024  # KiB: < 200 MB more


def test_alias_in_a_filter_value_that_never_matches_is_refused(cli, tagged, tmp_path):
    text = _ties(more=", lambda: [{filter: nothing_matches, value: &v 1.0}, {filter: nope, value: *v}]")
    code, out, err = _merge(cli, tagged, tmp_path, text)
    _one_line_error(code, out, err, 7, "anchors and aliases")
    with pytest.raises(RecipeError, match="anchors and aliases"):
        load_recipe("base: &b x\nmerge_method: linear\nmodels: [*b]\n")   # an anchor alone is refused too


def test_oversized_recipe_is_refused_without_reading_it_whole(cli, tagged, tmp_path):
    text = _ties(extra="name: \"" + "x" * (MAX_RECIPE_BYTES + 10) + "\"\n")
    code, out, err = _merge(cli, tagged, tmp_path, text)
    _one_line_error(code, out, err, 7, "recipe.yaml", "limit")
    with pytest.raises(RecipeError, match="over the limit"):
        load_recipe(text)


@pytest.mark.parametrize("opener,closer", [("[", "]"), ("{a: ", "}"), ("- ", "")])
def test_deep_nesting_is_refused(cli, tagged, tmp_path, opener, closer):
    depth = 100_000 if opener != "- " else MAX_DEPTH + 5
    nested = opener * depth + "1" + closer * depth
    nested = nested if opener != "- " else "\n  " + nested   # a block sequence starts its own line
    code, out, err = _merge(cli, tagged, tmp_path, _ties(extra=f"name: {nested}\n"))
    _one_line_error(code, out, err, 7, f"nested deeper than {MAX_DEPTH} levels")


@pytest.mark.parametrize("value,message", [
    ("!!python/object/apply:os.system ['echo pwned']", "python/object"),
    ("!!python/name:os.system", "python/name"),
    ("!!binary aGVsbG8=", "bytes"),
    ("!!set {a, b}", "set"),
    ("!!timestamp 2024-01-01", "date"),
    ("!!omap [a: 1]", "tuple"),
])
def test_tags_that_build_objects_are_refused(cli, tagged, tmp_path, value, message):
    code, out, err = _merge(cli, tagged, tmp_path, _ties(extra=f"name: {value}\n"))
    _one_line_error(code, out, err, 7, message)


def test_not_utf8_and_huge_integers_are_recipe_errors(cli, tagged, tmp_path):
    code, out, err = _merge(cli, tagged, tmp_path, _ties().encode() + b"name: \xff\xfe\n")
    _one_line_error(code, out, err, 7, "not UTF-8")
    code, out, err = _merge(cli, tagged, tmp_path, _ties(w1="9" * 5000))
    _one_line_error(code, out, err, 7, "not valid YAML")
    code, out, err = _merge(cli, tagged, tmp_path, _ties(w1="9" * 400))   # an int no float can hold
    _one_line_error(code, out, err, 7, "weight must be a finite number")


def test_plain_dates_stay_strings():
    recipe = load_recipe("name: 2024-01-01\nmerge_method: linear\nmodels: [a]\nparameters: {weight: 1}\n")
    assert recipe.raw["name"] == "2024-01-01"


# -- item 5: NaN, inf and out-of-domain values ----------------------------------------------------

@pytest.mark.parametrize("w1", [".nan", ".inf", "-.inf", "[0.5, .nan]", "[{filter: mlp, value: .inf}, {value: 1}]"])
def test_nan_and_inf_weights_in_recipes_are_refused(cli, tagged, tmp_path, w1):
    code, out, err = _merge(cli, tagged, tmp_path, _ties(w1=w1))
    _one_line_error(code, out, err, 7, "models[0].parameters.weight", "NaN and infinities are not allowed")


@pytest.mark.parametrize("weights", ["nan,1", "1,inf", "-inf,1"])
def test_nan_and_inf_weights_on_the_command_line_are_refused(cli, tagged, weights):
    before = _artifacts(tagged)
    code, out, err = cli("--store", tagged, "weighted-sum", "ft1", "ft2", "--weights", weights, "--name", "bad")
    _one_line_error(code, out, err, 7, "must be a finite number")
    assert _artifacts(tagged) == before


def test_breadcrumbs_negative_gamma_is_refused(cli, tagged, tmp_path):
    # today: silently returns the base model
    code, out, err = _merge(cli, tagged, tmp_path, _ties("breadcrumbs", more=", gamma: -5"))
    _one_line_error(code, out, err, 7, "models[0].parameters.gamma must be a number in [0, 1], got -5")


@pytest.mark.parametrize("method,setting,message", [
    ("ties", "density: 1.5", "density must be a number in [0, 1], got 1.5"),
    ("ties", "density: '0.5'", "density must be a number in [0, 1], got '0.5'"),
    ("della", "epsilon: 0.6", "epsilon must be a number in [0, 0.5), got 0.6"),
    ("della", "epsilon: -0.1", "epsilon must be a number in [0, 0.5), got -0.1"),
    ("ties", "lambda: [1, .inf]", "NaN and infinities"),
    ("ties", "normalize: 'yes'", "normalize must be true or false"),
    ("ties", "rescale_method: l2", "rescale_method must be inverse or l1"),
    ("breadcrumbs", "gamma: 1.01", "gamma must be a number in [0, 1]"),
])
def test_every_task_arithmetic_parameter_has_its_domain(cli, tagged, tmp_path, method, setting, message):
    code, out, err = _merge(cli, tagged, tmp_path, _ties(method, extra=f"parameters: {{{setting}}}\n"))
    _one_line_error(code, out, err, 7, message)


def test_slerp_t_and_sens_merging_settings_have_domains(cli, tagged, tmp_path):
    slerp = "merge_method: slerp\nbase_model: base\nmodels: [ft1]\nparameters: {t: %s}\n"
    _one_line_error(*_merge(cli, tagged, tmp_path, slerp % "[0, 1.5]"), 7, "t must be a number in [0, 1], got 1.5")
    _one_line_error(*_merge(cli, tagged, tmp_path, slerp % "-0.1"), 7, "t must be a number in [0, 1], got -0.1")
    sens = "merge_method: sens_merging\nbase_model: base\nmodels: [ft1, ft2]\nparameters: {calibration: c.txt, %s}\n"
    _one_line_error(*_merge(cli, tagged, tmp_path, sens % "calibration_samples: 0"), 7,
                    "calibration_samples must be an integer >= 1, got 0")
    _one_line_error(*_merge(cli, tagged, tmp_path, sens % "calibration_tokens: 2.5"), 7,
                    "calibration_tokens must be an integer >= 2, got 2.5")
    _one_line_error(*_merge(cli, tagged, tmp_path, sens % "temperature: -1"), 7,
                    "temperature must be a finite number > 0, got -1")


def test_int8_is_not_a_float_cast(cli, tagged):
    before = _artifacts(tagged)
    code, out, err = cli("--store", tagged, "convert", "ft1", "--dtype", "int8", "--name", "bad")
    # today: an all-zero artifact, exit 0
    _one_line_error(code, out, err, 6, "int8 is not a float dtype", "tensor 'model.embed_tokens.weight' is bfloat16")
    code, out, err = cli("--store", tagged, "weighted-sum", "ft1", "ft2", "--weights", "1,1", "--dtype", "int8")
    _one_line_error(code, out, err, 6, "int8 is not a float dtype")
    assert _artifacts(tagged) == before
    _one_line_error(*cli("--store", tagged, "merge", "/dev/null"), 7)   # an empty recipe: not a mapping


def test_recipe_dtype_must_be_a_float_dtype(cli, tagged, tmp_path):
    code, out, err = _merge(cli, tagged, tmp_path, _ties(extra="out_dtype: int8\n"))
    _one_line_error(code, out, err, 7, "out_dtype: int8 is not a float dtype")


# -- item 6: Mediator and Sens-Merging errors -------------------------------------------------------

def test_mediator_sigma_that_is_not_a_number(cli, tagged, tmp_path):
    text = "merge_method: mediator\nbase_model: base\nmodels: [ft1, ft2]\nparameters: {sigma: abc}\n"
    code, out, err = _merge(cli, tagged, tmp_path, text)   # today: ValueError traceback
    _one_line_error(code, out, err, 7, "parameters.sigma must be a finite number, got 'abc'")
    text = "merge_method: mediator\nbase_model: base\nmodels: [ft1, ft2]\nparameters: {sigma: 1, expert: ft3}\n"
    _one_line_error(*_merge(cli, tagged, tmp_path, text), 7, "expert 'ft3' is not one of the models")


def test_sens_merging_temperature_zero(cli, tagged, tmp_path):
    scores = tmp_path / "scores.yaml"
    scores.write_text("ft1: {'0': 1.0, '1': 2.0}\nft2: {'0': 2.0, '1': 1.0}\n")
    text = (f"merge_method: sens_merging\nbase_model: base\nmodels: [ft1, ft2]\n"
            f"parameters: {{sensitivity: {scores}, temperature: 0}}\n")
    code, out, err = _merge(cli, tagged, tmp_path, text)   # today: ZeroDivisionError traceback
    _one_line_error(code, out, err, 7, "temperature must be a finite number > 0, got 0")
    assert _merge(cli, tagged, tmp_path, text.replace("temperature: 0", "temperature: 0.5"))[0] == 0


@pytest.mark.parametrize("content,message", [
    ("ft1: {'0': .nan}\nft2: {'0': 1}\n", "NaN and infinities"),
    ("ft1: {'0': high}\nft2: {'0': 1}\n", "score of model ft1 layer 0 must be a finite number, got 'high'"),
    ("ft1: &s {'0': 1}\nft2: *s\n", "anchors and aliases"),
])
def test_bad_sensitivity_files(cli, tagged, tmp_path, content, message):
    scores = tmp_path / "scores.yaml"
    scores.write_text(content)
    text = f"merge_method: sens_merging\nbase_model: base\nmodels: [ft1, ft2]\nparameters: {{sensitivity: {scores}}}\n"
    _one_line_error(*_merge(cli, tagged, tmp_path, text), 7, message)


# -- item 11: exit codes of reference and count errors ----------------------------------------------

def test_missing_model_reference_is_exit_3(cli, tagged, tmp_path):
    text = _ties().replace("model: ft2", "model: no-such-model")
    _one_line_error(*_merge(cli, tagged, tmp_path, text), 3, "'no-such-model' is not an artifact")
    code, out, err = cli("--store", tagged, "weighted-sum", "ft1", "nope", "--weights", "1,1")
    _one_line_error(code, out, err, 3, "'nope' is not an artifact")
    _one_line_error(*cli("--store", tagged, "convert", "nope", "--dtype", "fp16"), 3, "'nope'")


def test_models_given_as_a_string_is_exit_7(cli, tagged, tmp_path):
    text = "merge_method: linear\nmodels: ft1\nparameters: {weight: 1}\n"
    _one_line_error(*_merge(cli, tagged, tmp_path, text), 7, "models must be a list", "got str 'ft1'")
    text = "merge_method: ties\nbase_model: {path: base}\nmodels: [ft1]\nparameters: {weight: 1, density: 0.5}\n"
    _one_line_error(*_merge(cli, tagged, tmp_path, text), 7, "base_model needs a 'model' reference")


def test_weights_count_mismatch_is_exit_7(cli, tagged):
    # a parameter of the request, like a recipe's: RecipeError's code, as plan_map's own count check
    code, out, err = cli("--store", tagged, "weighted-sum", "ft1", "ft2", "--weights", "1,2,3")
    _one_line_error(code, out, err, 7, "2 models but 3 weights (ft1, ft2)")
    with pytest.raises(InvalidParameter):
        api.weighted_sum(Store(tagged), ["ft1"], [float("nan")])


def test_every_domain_is_documented_in_the_readme():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    rows = {}   # a key may have a row per domain (slerp's t and nearswap's t differ)
    for line in readme.splitlines():
        if line.strip().startswith("| `"):
            rows.setdefault(line.strip().split("|")[1].strip(), []).append(line.strip())
    for (method, key), domain in PARAMETER_DOMAINS.items():
        assert f"`{key}`" in rows, key
        assert any(row.endswith(f"| {domain.text} |") for row in rows[f"`{key}`"]), (method, key, domain.text)


def test_unavailable_hub_reference_is_exit_3(cli, tagged, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))   # an empty cache
    code, out, err = cli("--store", tagged, "weighted-sum", "ft1", "nobody/no-such-model", "--weights", "1,1")
    _one_line_error(code, out, err, 3, "nobody/no-such-model")
    _one_line_error(*cli("--store", tagged, "convert", "hf://..", "--dtype", "fp16"), 3, "not a hub reference")


@pytest.mark.parametrize("size", ["nan", "infG", "-1G", "lots", "0"])
def test_bad_memory_and_shard_sizes(cli, tagged, tmp_path, size):
    """Not a size: usage error (2), as click does for every option; a zero size: InvalidParameter (7)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_ties())
    for args, option in [(("convert", "ft1", "--dtype", "fp16", "--max-memory", size), "--max-memory"),
                         (("merge", recipe, "-o", tmp_path / "out", "--max-shard-size", size), "--max-shard-size")]:
        code, out, err = cli("--store", tagged, *args)
        if size == "0":
            _one_line_error(code, out, err, 7, f"{option} must be a positive size")
        else:
            assert code == 2 and f"Invalid value for '{option}'" in err and "Traceback" not in err, err


@pytest.mark.parametrize("op,roles,params,message", [
    ("task_arithmetic", {"base": "base", "models": ["ft1"]}, {"weights": [float("nan")]}, "weights must be finite"),
    ("task_arithmetic", {"base": "base", "models": ["ft1"]}, {"weights": [1.0], "lam": float("inf")}, "lambda must be finite"),
    ("task_arithmetic", {"base": "base", "models": ["ft1"]},
     {"weights": [1.0], "densities": [0.5], "gammas": [-5], "sparsification": "magnitude_outliers"}, "gammas"),
    ("task_arithmetic", {"base": "base", "models": ["ft1"]},
     {"weights": [1.0], "densities": [0.5], "epsilons": [float("nan")], "sparsification": "della"}, "epsilons"),
    ("slerp", {"a": "ft1", "b": "ft2"}, {"t": float("nan")}, "t must be in"),
    ("nuslerp", {"models": ["ft1", "ft2"]}, {"weights": [1.0, float("inf")]}, "weights must be finite"),
])
def test_kernel_params_refuse_nan_from_the_python_api(tiny_family, op, roles, params, message):
    """plan_map (the Python API below recipes) checks the same domains when the plan is built."""
    from tensorstore_llm.engine import plan_map
    from tensorstore_llm.io.hf_dir import HFCheckpointSource

    sources = {k: HFCheckpointSource(tiny_family[k]) for k in ("base", "ft1", "ft2")}
    try:
        with pytest.raises(RecipeError, match=message):
            plan_map(op, sources, roles, params=params)
    finally:
        for s in sources.values():
            s.close()


def _sens_family(tiny_family, tmp_path):
    from test_layer_methods import CORPUS, _with_tokenizer

    dirs = {k: _with_tokenizer(tiny_family[k], tmp_path / k) for k in ("base", "ft1", "ft2")}
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS) + "\n")
    return dirs


def test_sens_merging_calibration_limits_and_non_finite_scores(cli, tiny_family, tmp_path):
    """calibration_tokens over the model's context, and a model whose loss is NaN, are recipe errors."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    dirs = _sens_family(tiny_family, tmp_path)
    recipe = tmp_path / "sens.yaml"
    text = (f"merge_method: sens_merging\nbase_model: {dirs['base']}\nmodels: [{dirs['ft1']}, {dirs['ft2']}]\n"
            f"parameters: {{calibration: {tmp_path / 'corpus.txt'}, calibration_tokens: %d}}\n")
    recipe.write_text(text % 100_000)
    store = tmp_path / "store"
    _one_line_error(*cli("--store", store, "merge", recipe), 7, "calibration_tokens 100000 is over the model's context of 2048")
    (weights_file,) = [f for f in os.listdir(dirs["ft1"]) if f.endswith(".safetensors")]
    path = os.path.join(dirs["ft1"], weights_file)
    weights = load_file(path)
    weights["model.norm.weight"] = weights["model.norm.weight"] * float("nan")
    save_file(weights, path, metadata={"format": "pt"})
    recipe.write_text(text % 64)
    _one_line_error(*cli("--store", store, "merge", recipe), 7, "is nan", "not finite")


def test_calibration_corpus_reads_are_bounded(cli, tagged, tmp_path):
    """A corpus that is a device (/dev/zero: no newline, ever) or has a huge line is refused, not slurped."""
    for corpus in ("/dev/zero", tmp_path / "long.txt"):
        if corpus != "/dev/zero":
            corpus.write_text("short line\n" + "x" * (2 << 20) + "\n")
        text = (f"merge_method: sens_merging\nbase_model: base\nmodels: [ft1, ft2]\n"
                f"parameters: {{calibration: {corpus}, calibration_samples: 8}}\n")
        _one_line_error(*_merge(cli, tagged, tmp_path, text), 7, "a line longer than 1048576 characters")
