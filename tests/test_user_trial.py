"""Findings of a new user's trial (from a fresh clone, following README), kept as tests.

Each test states what a user expected and did not get, and now gets.
"""
import os

import pytest
import torch

import tensorstore_llm as ts
from tensorstore_llm.testing.synth import write_checkpoint

RECIPE = """merge_method: ties
base_model: base
models:
  - model: ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: ft2
    parameters: {weight: 0.5, density: 0.5}
parameters: {normalize: true}
dtype: float32
"""


def test_merge_of_a_bf16_base_and_fp32_finetunes_follows_the_recipe_dtype(tmp_path):
    """A mergekit recipe over a bf16 base and fp32 fine-tunes (what a user has after fine-tuning in
    fp32 a base downloaded in bf16) merges in the recipe's dtype, as mergekit does: the result
    equals the merge of the same recipe after converting the base to fp32 by hand."""
    store = ts.open_store(str(tmp_path / "store"))
    ts.import_checkpoint(write_checkpoint(str(tmp_path / "base"), "tiny"), store, name="base")
    for k in (1, 2):
        ts.import_checkpoint(write_checkpoint(str(tmp_path / f"ft{k}"), "tiny", finetune=k, dtype="float32"),
                             store, name=f"ft{k}")
    ts.convert(store, "base", dtype="float32", name="base32")
    reference = ts.merge(store, RECIPE.replace("base_model: base", "base_model: base32"), name="by-hand")

    mixed = ts.merge(store, RECIPE, name="mixed")

    with store.open(mixed.artifact.id) as got, store.open(reference.artifact.id) as want:
        assert sorted(got.keys()) == sorted(want.keys())
        for name in want.keys():
            assert got.meta(name).dtype == "float32", name
            assert torch.equal(got.read(name), want.read(name)), name


def test_readme_python_example_ts_merge_is_callable_after_the_merge_package_is_imported(tmp_path):
    """README's "From Python" calls ``ts.merge(store, recipe, ...)`` after other API calls. Importing
    the ``tensorstore_llm.merge`` subpackage (the API does) used to replace the attribute with the
    module: TypeError: 'module' object is not callable. The merge is checked against a direct formula."""
    import tensorstore_llm.merge.recipe  # noqa: F401  (what any merge-related call imports)

    assert callable(ts.merge)
    store = ts.open_store(str(tmp_path / "store"))
    for k, name in ((1, "ft1"), (2, "ft2")):
        ts.import_checkpoint(write_checkpoint(str(tmp_path / name), "tiny", finetune=k), store, name=name)
    recipe = "merge_method: linear\nmodels:\n  - {model: ft1, parameters: {weight: 0.3}}\n" \
             "  - {model: ft2, parameters: {weight: 0.7}}\ndtype: bfloat16\n"
    result = ts.merge(store, recipe, name="blend", max_memory="1M")
    with store.open(result.artifact.id) as got, store.open("ft1") as a, store.open("ft2") as b:
        for name in a.keys():
            want = ((0.3 * a.read(name).float() + 0.7 * b.read(name).float()) / 1.0).to(torch.bfloat16)
            assert torch.equal(got.read(name), want), name
    from tensorstore_llm import merge as merge_package

    assert merge_package.recipe.__name__ == "tensorstore_llm.merge.recipe"   # still the package


def test_readme_diff_eval_example_corpus_is_long_enough():
    """README's `tsllm diff-eval ... --corpus C` example must name a corpus with at least the 16
    windows of 256 tokens that the command's defaults ask for (it named literature.txt alone: 6)."""
    import re

    from transformers import AutoTokenizer

    from tensorstore_llm.diff.evaluate import eval_text

    root = os.path.join(os.path.dirname(__file__), "..")
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    corpora = re.findall(r"tsllm diff-eval \S+ --reference \S+ --corpus (\S+)", readme)
    assert corpora, "README has no diff-eval example with --corpus"
    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    try:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())   # the diff-eval models' tokenizer
    except Exception as e:   # SmolLM2 is not installed here
        pytest.skip(f"SmolLM2's tokenizer is not available: {e}")
    for corpus in corpora:
        text = eval_text(tokenizer, os.path.join(root, corpus))   # raises DatasetMismatch when too short
        assert len(text.batches) == 4 and text.batches[0].shape == (4, 256)
