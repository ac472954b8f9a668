"""``slices:`` and ``passthrough`` (issue 14, item 1): frankenmerges with a different layer count
get a correct config.json, tensor names and index, load in transformers, and equal mergekit's
output on the same generated models (mergekit, when installed); a multi-source slice with
per-slice parameters and gradients equals a direct formula; bad layer ranges fail before work."""
import importlib.util
import json

import pytest
import torch

from tensorstore_llm import api
from tensorstore_llm.errors import RecipeError
from tensorstore_llm.store import Store

from helpers import dir_tensors


def _config(path):
    return json.loads((path / "config.json").read_text())


def _merge(tmp_path, text, **options):
    """``api.merge`` of recipe ``text`` into ``tmp_path/"hf"`` (a fresh store); returns that directory."""
    out = tmp_path / "hf"
    api.merge(Store(str(tmp_path / "s")), text, out_dir=str(out), progress=False, **options)
    return out


def _mergekit(tmp_path, text):
    """mergekit's ``run_merge`` of the same recipe into ``tmp_path/"mk"`` (mergekit must be installed)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    out = tmp_path / "mk"
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return out


def _moved(tensors, source_layer, layer):
    """The tensors of layer ``source_layer``, renamed to layer ``layer``."""
    old, new = f".layers.{source_layer}.", f".layers.{layer}."
    return {name.replace(old, new): value for name, value in tensors.items() if old in name}


def _layers_from(origin, sources):
    """The layer tensors a frankenmerge holds: for each new layer, those of ``origin[layer]`` =
    (model, its layer) taken from ``sources[model]`` and renamed to the new layer."""
    return {name: value for layer, (model, source_layer) in origin.items()
            for name, value in _moved(sources[model], source_layer, layer).items()}


def _frankenmerge(family):
    """4 layers from 2-layer models: ft1's layer 0, ft2's layers 0-1, base's layer 1 (scaled o_proj)."""
    return (f"merge_method: passthrough\nslices:\n"
            f"  - sources: [{{model: {family['ft1']}, layer_range: [0, 1]}}]\n"
            f"  - sources: [{{model: {family['ft2']}, layer_range: [0, 2]}}]\n"
            f"  - sources:\n      - model: {family['base']}\n        layer_range: [1, 2]\n"
            f"        parameters: {{scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]}}\n"
            f"dtype: bfloat16\n")


def _task_arithmetic_slices(family):
    """Task arithmetic per slice with a weight gradient over a slice and a per-slice weight, fp32."""
    b, x, y = family["base"], family["ft1"], family["ft2"]
    return (f"merge_method: task_arithmetic\nbase_model: {b}\nslices:\n"
            f"  - sources:\n      - {{model: {b}, layer_range: [0, 2]}}\n"
            f"      - {{model: {x}, layer_range: [0, 2], parameters: {{weight: [1.0, 0.2]}}}}\n"
            f"      - {{model: {y}, layer_range: [0, 2], parameters: {{weight: 0.5}}}}\n"
            f"  - sources:\n      - {{model: {b}, layer_range: [1, 2]}}\n      - {{model: {x}, layer_range: [0, 1]}}\n"
            f"    parameters: {{weight: 0.7}}\n"
            f"dtype: float32\nout_dtype: float32\n")


def test_frankenmerge_layers_names_config_and_values(tmp_path, tiny_family):
    out = _merge(tmp_path, _frankenmerge(tiny_family), max_shard_size="40K")
    merged = dir_tensors(out)
    assert _config(out)["num_hidden_layers"] == 4
    src = {k: dir_tensors(v) for k, v in tiny_family.items()}
    expected = _layers_from({0: ("ft1", 0), 1: ("ft2", 0), 2: ("ft2", 1), 3: ("base", 1)}, src)
    for name, value in expected.items():       # the base's layer (now 3) has its o_proj scaled by 0.5
        if ".layers.3." in name and "o_proj" in name:
            expected[name] = (value.float() * 0.5).to(value.dtype)
    expected["model.embed_tokens.weight"] = src["ft1"]["model.embed_tokens.weight"]       # first slice
    expected["model.norm.weight"] = src["base"]["model.norm.weight"]                       # last slice
    expected["lm_head.weight"] = src["base"]["lm_head.weight"]
    assert sorted(merged) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(merged[name], value), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(expected)


def test_frankenmerge_loads_in_transformers(tmp_path, tiny_family):
    transformers = pytest.importorskip("transformers")
    out = _merge(tmp_path, _frankenmerge(tiny_family))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    assert len(model.model.layers) == 4
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 42]])).logits
    assert logits.shape == (1, 4, 512) and torch.isfinite(logits).all()


def test_multi_source_slices_with_per_slice_parameters(tmp_path, tiny_family):
    """linear per slice: slice 0 merges ft1/ft2 layers 0..1 with a weight gradient over the slice,
    slice 1 repeats layer 1 of both with a per-slice weight."""
    x, y = tiny_family["ft1"], tiny_family["ft2"]
    text = (f"merge_method: linear\nslices:\n"
            f"  - sources:\n      - {{model: {x}, layer_range: [0, 2], parameters: {{weight: [1.0, 0.0]}}}}\n"
            f"      - {{model: {y}, layer_range: [0, 2], parameters: {{weight: 1.0}}}}\n"
            f"  - sources:\n      - {{model: {x}, layer_range: [1, 2]}}\n      - {{model: {y}, layer_range: [1, 2]}}\n"
            f"    parameters: {{weight: 0.25}}\n"
            f"dtype: float32\nout_dtype: float32\n")
    out = _merge(tmp_path, text)
    merged, sx, sy = dir_tensors(out), dir_tensors(x), dir_tensors(y)
    name = "model.layers.{}.mlp.up_proj.weight"
    # slice 0, layer 0: t = 0, weights (1, 1); layer 1: t = 1, weights (0, 1)
    assert torch.allclose(merged[name.format(0)], (sx[name.format(0)].float() + sy[name.format(0)].float()) / 2, atol=1e-7)
    assert torch.equal(merged[name.format(1)], sy[name.format(1)].float())
    # slice 1 (one layer): both weights 0.25, normalised: the plain mean of layer 1
    assert torch.allclose(merged[name.format(2)], (sx[name.format(1)].float() + sy[name.format(1)].float()) / 2, atol=1e-7)
    assert _config(out)["num_hidden_layers"] == 3


@pytest.mark.parametrize("recipe, atol", [(_frankenmerge, 0.0), (_task_arithmetic_slices, 1e-6)],
                         ids=["frankenmerge-bit-exact", "multi-source-task-arithmetic-fp32"])
def test_matches_mergekit(tmp_path, tiny_family, recipe, atol):
    """The same tensors and layer count as mergekit's run_merge: bit for bit for the passthrough
    frankenmerge, within fp32 rounding for task arithmetic over multi-source slices."""
    pytest.importorskip("mergekit")
    text = recipe(tiny_family)
    mk, ours = _mergekit(tmp_path, text), _merge(tmp_path, text)
    theirs, merged = dir_tensors(mk), dir_tensors(ours)
    assert sorted(theirs) == sorted(merged)
    for name in theirs:
        torch.testing.assert_close(merged[name], theirs[name], atol=atol, rtol=0, msg=name)
    assert _config(ours)["num_hidden_layers"] == _config(mk)["num_hidden_layers"]


@pytest.mark.parametrize("slices,match", [
    ("[{sources: [{model: FT1, layer_range: [0, 3]}]}]", r"slices\[0\].sources\[0\].layer_range \[0, 3\) is out of range: .* has 2 layers"),
    ("[{sources: [{model: FT1, layer_range: [1, 1]}]}]", r"layer_range must be \[start, stop\) with 0 <= start < stop"),
    ("[{sources: [{model: FT1, layer_range: [2, 3]}]}]", r"slices\[0\].sources\[0\].layer_range \[2, 3\) is out of range"),
    (("[{sources: [{model: FT1, layer_range: [0, 1]}]}, {sources: [{model: FT2, layer_range: [0, 2]}, "
      "{model: FT1, layer_range: [1, 3]}]}]"), r"slices\[1\].sources\[1\].layer_range \[1, 3\) is out of range: .*ft1 has 2 layers"),
    ("[{sources: [{model: FT1, layer_range: [0, 2]}, {model: FT2, layer_range: [0, 1]}]}]",
     (r"slices\[0\].sources\[1\] \(.*ft2\) layer_range \[0, 1\) spans 1 layer\(s\), but sources\[0\] \(.*ft1\) "
      r"\[0, 2\) spans 2: every source of a slice must span the same number of layers")),
    ("[{sources: [{model: FT1, layer_range: [-1, 1]}]}]", r"slices\[0\].sources\[0\].layer_range must be .* got \[-1, 1\]"),
    ("[{sources: [{model: FT1, layer_range: [2, 1]}]}]", r"slices\[0\].sources\[0\].layer_range must be .* got \[2, 1\]"),
    ("[{sources: [{model: FT1, layer_range: [0, 1]}]}, {sources: [{model: FT1, layer_range: [1, 0]}]}]",
     r"slices\[1\].sources\[0\].layer_range must be"),
    ("[{sources: [{model: FT1, layer_range: [0, 1.5]}]}]", "layer_range must be"),
    ("[{sources: [{model: FT1}]}]", "layer_range must be"),
])
def test_bad_layer_ranges_fail_before_any_work(tmp_path, tiny_family, slices, match):
    text = ("merge_method: linear\nslices: " + slices.replace("FT1", tiny_family["ft1"]).replace("FT2", tiny_family["ft2"])
            + "\n")
    store = Store(str(tmp_path / "s"))
    with pytest.raises(RecipeError, match=match):
        api.merge(store, text, out_dir=str(tmp_path / "hf"), progress=False)
    assert store.list() == [] and not (tmp_path / "hf").exists()


def test_overlapping_slices_stack_layers_as_mergekit(tmp_path, tiny_family):
    """The same layers used twice (self-stacking, depth up-scaling) is accepted, as in mergekit:
    layers [0, 2) then [0, 2) again, and [1, 2) of a second model, give 5 layers whose tensors are
    the sources' own."""
    x, y = tiny_family["ft1"], tiny_family["ft2"]
    text = (f"merge_method: passthrough\nslices:\n"
            f"  - sources: [{{model: {x}, layer_range: [0, 2]}}]\n"
            f"  - sources: [{{model: {x}, layer_range: [0, 2]}}]\n"
            f"  - sources: [{{model: {y}, layer_range: [1, 2]}}]\n"
            f"dtype: bfloat16\n")
    out = _merge(tmp_path, text)
    merged, src = dir_tensors(out), {"ft1": dir_tensors(x), "ft2": dir_tensors(y)}
    expected = _layers_from({0: ("ft1", 0), 1: ("ft1", 1), 2: ("ft1", 0), 3: ("ft1", 1), 4: ("ft2", 1)}, src)
    assert len(expected) == 5 * len(_moved(src["ft1"], 0, 0))
    for name, value in expected.items():
        assert torch.equal(merged[name], value), name
    assert _config(out)["num_hidden_layers"] == 5
    if importlib.util.find_spec("mergekit") is not None:
        theirs = dir_tensors(_mergekit(tmp_path, text))
        assert sorted(theirs) == sorted(merged)
        assert all(torch.equal(theirs[name], merged[name]) for name in theirs)
