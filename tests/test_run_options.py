"""RunOptions: one object for how a job runs, accepted by every API call; the keyword form still
works and gives the same artifact; the CLI builds one per command."""
import pytest

from tensorstore_llm import api
from tensorstore_llm.engine.options import RunOptions


def _dare(family):
    return (f"merge_method: dare_linear\nbase_model: {family['base']}\nmodels:\n"
            f"  - model: {family['ft1']}\n    parameters: {{weight: 1.0, density: 0.5}}\n")


def test_options_and_keywords_give_the_same_artifact(store, tiny_family):
    by_options = api.merge(store, _dare(tiny_family), options=RunOptions(seed=3, max_memory="16K", progress=False))
    by_keywords = api.merge(store, _dare(tiny_family), seed=3, max_memory="1M", progress=False)
    other_seed = api.merge(store, _dare(tiny_family), options=RunOptions(seed=4, progress=False))
    assert by_options.artifact.id == by_keywords.artifact.id
    assert by_options.artifact.manifest.tensors == by_keywords.artifact.manifest.tensors
    assert other_seed.artifact.manifest.tensors != by_options.artifact.manifest.tensors   # DARE masks follow the seed


def test_keywords_override_options_and_unknown_ones_are_refused(store, tiny_family):
    estimate_only = api.weighted_sum(store, [tiny_family["ft1"], tiny_family["ft2"]], [0.5, 0.5],
                                     options=RunOptions(progress=False), dry_run=True)
    assert estimate_only.artifact is None and estimate_only.estimate.jobs
    assert RunOptions.of(RunOptions(seed=1), seed=2) == RunOptions(seed=2)
    with pytest.raises(TypeError, match="unknown run option"):
        RunOptions.of(None, max_memroy="1G")
    with pytest.raises(TypeError, match="must be a RunOptions"):
        RunOptions.of({"seed": 1})


def test_the_cli_builds_one_options_object(cli, tmp_path, tiny_family):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_dare(tiny_family))
    code, out, err = cli("--store", tmp_path / "s", "-q", "merge", recipe, "--seed", "3", "--max-memory", "16K")
    assert code == 0, err
    from tensorstore_llm.store import Store

    again = api.merge(Store(str(tmp_path / "s")), _dare(tiny_family), options=RunOptions(seed=3, progress=False))
    assert out.strip() == again.artifact.id
