"""Recipes over models stored in different dtypes (a bf16 base, an fp32 fine-tune) merge as
mergekit 0.1.5 merges them: every input is cast to the recipe's ``dtype``, else to the inputs'
promoted dtype (bf16 with fp32: fp32), which is the output's dtype unless ``out_dtype`` /
``dtype`` names one. Compared with mergekit on a tiny family: ``arithmetic="mergekit"``
bit for bit, the default fp32 arithmetic within 1e-6 (as tests/test_vs_mergekit.py); TIES only
at threshold ties, where mergekit's unstable argsort may keep either entry.
"""
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from tensorstore_llm.api import convert, import_checkpoint, merge
from tensorstore_llm.errors import DTypeError, ShapeMismatch
from tensorstore_llm.testing.synth import write_checkpoint

from helpers import dir_tensors

TASK_ARITHMETIC = ("merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft1}\n"
                   "    parameters: {{weight: 0.7}}\n  - model: {ft2}\n    parameters: {{weight: [0.2, 0.9]}}\n"
                   "parameters: {{lambda: 0.8}}\n")
TIES = ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1.0, density: 0.4}}\n"
        "  - model: {ft2}\n    parameters: {{weight: 0.6, density: 0.7}}\n")
PASSTHROUGH = ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {ft1}\n        layer_range: [0, 1]\n"
               "  - sources:\n      - model: {base}\n        layer_range: [1, 2]\n")
DENSITIES = (0.4, 0.7)


@pytest.fixture(scope="module")
def mixed_family(tmp_path_factory):
    """A bf16 base, an fp32 fine-tune (ft1) and a bf16 one (ft2) of the 'tiny' preset."""
    root = tmp_path_factory.mktemp("mixed-family")
    return {"base": write_checkpoint(str(root / "base"), "tiny"),
            "ft1": write_checkpoint(str(root / "ft1"), "tiny", finetune=1, dtype="float32"),
            "ft2": write_checkpoint(str(root / "ft2"), "tiny", finetune=2)}


def _mergekit(text, out):
    mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (pip install mergekit): comparison skipped")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    assert mergekit
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return dir_tensors(out)


def _at_a_threshold(family, name, dtype):
    """Entries whose |τ| (computed in ``dtype``, as the merge does) equals the TIES cut-off of a model."""
    base = dir_tensors(family["base"])[name].to(dtype)
    tied = torch.zeros(base.shape, dtype=torch.bool)
    for ref, density in zip(("ft1", "ft2"), DENSITIES):
        tau = (dir_tensors(family[ref])[name].to(dtype) - base).float().abs().reshape(-1)
        k = max(1, int(density * tau.numel()))
        tied |= (tau == tau.kthvalue(tau.numel() - k + 1).values).reshape(base.shape)
    return tied


@pytest.mark.parametrize("recipe, extra, arithmetic, out_dtype", [
    (TASK_ARITHMETIC, "dtype: bfloat16\n", "mergekit", torch.bfloat16),   # fp32 ft1 rounded to bf16 first
    (TASK_ARITHMETIC, "", "mergekit", torch.float32),                     # no dtype: promoted, fp32
    (TASK_ARITHMETIC, "", "fp32", torch.float32),
    (TIES, "dtype: float32\n", "fp32", torch.float32),
    (TIES, "dtype: bfloat16\n", "mergekit", torch.bfloat16),
    (PASSTHROUGH, "", "fp32", None),   # each tensor keeps its source's dtype, as in mergekit
])
def test_mixed_dtypes_merge_as_mergekit(tmp_path, store, mixed_family, recipe, extra, arithmetic, out_dtype):
    text = recipe.format(**mixed_family) + extra
    theirs = _mergekit(text, tmp_path / "mk")
    ours = merge(store, text, where="mixed.yaml", progress=False, max_memory="32K", arithmetic=arithmetic).artifact
    compute = torch.bfloat16 if "bfloat16" in extra else torch.float32
    with store.open(ours.id) as got:
        assert sorted(got.keys()) == sorted(theirs)
        if out_dtype is None:
            assert {got.meta(name).dtype for name in got.keys()} == {"bfloat16", "float32"}
        for name in got.keys():
            a, b = got.read(name), theirs[name]
            assert a.dtype == b.dtype == (out_dtype or a.dtype), name
            same = torch.isclose(a.float(), b.float(), atol=1e-6 if arithmetic == "fp32" else 0.0, rtol=0)
            if arithmetic == "mergekit":
                same |= a.view(torch.int16 if a.dtype == torch.bfloat16 else torch.int32) == \
                    b.view(torch.int16 if b.dtype == torch.bfloat16 else torch.int32)
            if recipe is TIES:
                assert (~same <= _at_a_threshold(mixed_family, name, compute)).all(), name
                assert a.numel() < 1000 or same.float().mean() >= 0.9, (name, same.float().mean())
            else:
                assert same.all(), (name, int((~same).sum()))


def test_mixed_merge_equals_the_merge_after_converting_by_hand(store, mixed_family):
    """A bf16 base with fp32 fine-tunes and ``dtype: float32``: the same tensors, bit for bit, as
    converting the base to fp32 first (what a user had to do before)."""
    for ref in ("base", "ft1", "ft2"):
        import_checkpoint(mixed_family[ref], store, name=ref, progress=False)
    convert(store, "base", dtype="float32", name="base32", progress=False)
    text = TIES.format(base="base", ft1="ft1", ft2="ft2") + "dtype: float32\n"
    by_hand = merge(store, text.replace("base_model: base", "base_model: base32"), progress=False).artifact
    mixed = merge(store, text, progress=False).artifact
    with store.open(mixed.id) as got, store.open(by_hand.id) as want:
        assert sorted(got.keys()) == sorted(want.keys())
        for name in want.keys():
            assert got.meta(name).dtype == "float32"
            assert torch.equal(got.read(name), want.read(name)), name


def _with_extra(src, dst, name, tensor):
    """A copy of checkpoint ``src`` with one more tensor in a single shard."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    tensors = dir_tensors(src)
    tensors[name] = tensor
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def test_a_non_float_dtype_mix_is_refused_naming_recipe_tensor_inputs_and_remedy(tmp_path, store, mixed_family):
    base = _with_extra(mixed_family["base"], str(tmp_path / "b"), "model.position_ids", torch.arange(8))
    ft = _with_extra(mixed_family["ft2"], str(tmp_path / "f"), "model.position_ids", torch.arange(8, dtype=torch.int32))
    text = f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft}\n    parameters: {{weight: 1.0}}\n"
    with pytest.raises(DTypeError) as err:
        merge(store, text, where="ints.yaml", progress=False)
    message = str(err.value)
    assert "\n" not in message
    for part in ("ints.yaml", "'model.position_ids'", "int32", "int64", f"input {ft}", f"input {base}", "tsllm convert --dtype"):
        assert part in message, (part, message)
    assert "shape" not in message and "vocabulary" not in message
    assert not store.list()   # nothing written


def test_a_shape_mismatch_of_mixed_dtypes_still_names_shapes(tmp_path, store, mixed_family):
    base = _with_extra(mixed_family["base"], str(tmp_path / "b"), "lm_head.extra", torch.zeros(4, 2, dtype=torch.bfloat16))
    ft = _with_extra(mixed_family["ft1"], str(tmp_path / "f"), "lm_head.extra", torch.zeros(4, 3))
    text = f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1.0}}\n  - model: {ft}\n    parameters: {{weight: 1.0}}\n"
    with pytest.raises(ShapeMismatch, match=r"shapes\.yaml .*different shapes.*'lm_head\.extra'"):
        merge(store, text, where="shapes.yaml", progress=False)
