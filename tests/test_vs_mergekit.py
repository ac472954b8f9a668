"""Our merges against mergekit's on the same generated checkpoints (mergekit computing in fp32).

Deterministic methods must agree to fp32 rounding (atol 1e-6 on weights of scale 0.02); for the
magnitude-threshold methods, entries whose magnitude ties the threshold may go either way in
mergekit (it keeps exactly k by an unstable argsort), so at most 0.5% of entries may differ.
DARE / DELLA draw from different RNGs by design and are compared by their statistics elsewhere.
SLERP is per tensor in both (mergekit 0.1.5's slerp kernel takes a batch of whole tensors,
stacked on its leading "output" axis, and flattens each).

With ``arithmetic="mergekit"`` and ``dtype: bfloat16`` we replay mergekit's bf16 operations: then
linear and task arithmetic must match bit for bit, and TIES / breadcrumbs everywhere except at
threshold ties.
"""
import os

import pytest
import torch

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (pip install mergekit) — comparison skipped")

from safetensors.torch import load_file  # noqa: E402

from tensorstore_llm import api  # noqa: E402

RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.7}}\n  - model: {ft2}\n    parameters: {{weight: 0.5}}\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.7}}\n  - model: {ft2}\n    parameters: {{weight: [0.2, 0.9]}}\nparameters: {{lambda: 0.8}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1.0, density: 0.4}}\n  - model: {ft2}\n    parameters: {{weight: 0.6, density: 0.7}}\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n",
    "nuslerp": "merge_method: nuslerp\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1.0}}\n  - model: {ft2}\n    parameters: {{weight: 3.0}}\n",
    "nuslerp_base": "merge_method: nuslerp\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 2.0}}\n  - model: {ft2}\n    parameters: {{weight: 1.0}}\n",
    "model_stock_filter_wise": "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\nparameters: {{filter_wise: true}}\n",
    "nuslerp_rows": "merge_method: nuslerp\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1.0}}\n  - model: {ft2}\n    parameters: {{weight: 3.0}}\nparameters: {{nuslerp_flatten: false}}\n",
    "nuslerp_columns": "merge_method: nuslerp\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 2.0}}\n  - model: {ft2}\n    parameters: {{weight: 1.0}}\nparameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\n",
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {ft1}\nparameters: {{t: 0.3}}\n",
    "multislerp": "merge_method: multislerp\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1.0}}\n  - model: {ft2}\n    parameters: {{weight: 2.0}}\n",
    "multislerp_base": "merge_method: multislerp\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1.0}}\n  - model: {ft2}\n    parameters: {{weight: 0.5}}\nparameters: {{normalize_weights: false}}\n",
    "karcher": "merge_method: karcher\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n",
    "sce": "merge_method: sce\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n",
    "nearswap": "merge_method: nearswap\nbase_model: {base}\nmodels:\n  - model: {ft1}\nparameters: {{t: 0.005}}\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {ft1}\n",
    "ram": "merge_method: ram\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\nparameters: {{epsilon: 0.004}}\n",
    "ramplus_tl": "merge_method: ramplus_tl\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\nparameters: {{epsilon: 0.004, r: 0.5, alpha: 0.6}}\n",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 1.0, density: 0.5, gamma: 0.05}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.6}}\n",
}
THRESHOLD_METHODS = {"ties", "breadcrumbs_ties"}
WHOLE_TENSOR_REPLAYS = {"model_stock", "model_stock_filter_wise", "nuslerp", "nuslerp_base", "nuslerp_rows",
                        "nuslerp_columns"}   # need a tensor in memory (sce and arcee_fusion stream: statistics passes)


def _load_dir(path):
    out = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _at_a_threshold(family, name, method, dtype=torch.float32):
    """Entries whose |τ| equals a cut-off magnitude of one of the models (where the rules differ);
    τ is computed in ``dtype`` as the merge does."""
    from tensorstore_llm.io.hf_dir import HFCheckpointSource

    specs = {"ties": [(0.4, 0.0), (0.7, 0.0)], "breadcrumbs_ties": [(0.5, 0.05), (0.6, 0.01)]}[method]
    with HFCheckpointSource(family["base"]) as b, HFCheckpointSource(family["ft1"]) as x, HFCheckpointSource(family["ft2"]) as y:
        base = b.read(name).to(dtype)
        taus = [(x.read(name).to(dtype) - base).float(), (y.read(name).to(dtype) - base).float()]
    tied = torch.zeros(base.shape, dtype=torch.bool)
    for tau, (density, gamma) in zip(taus, specs):
        flat, n = tau.abs().reshape(-1), tau.numel()
        target = int(density * n) if method != "ties" else max(1, int(density * n))
        cuts = [target] if method == "ties" else [n - max(0, n - target - int(gamma * n)) - target]
        cuts += [cuts[0] + target] if method != "ties" else []
        for k in cuts:
            if 0 < k <= n:
                tied |= tau.abs() == flat.kthvalue(n - k + 1).values
    return tied


def _run_mergekit(text, out):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return _load_dir(out)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "breadcrumbs_ties", "model_stock", "nuslerp",
                                    "nuslerp_base", "nuslerp_rows", "nuslerp_columns", "model_stock_filter_wise",
                                    "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"])
def test_mergekit_bf16_arithmetic_is_replayed_bit_for_bit(tmp_path, store, tiny_family, method):
    text = RECIPES[method].format(**tiny_family) + "dtype: bfloat16\n"
    if method in ("arcee_fusion", "ramplus_tl"):   # their fp32 factors promote mergekit's result: fp32 unless out_dtype
        text += "out_dtype: bfloat16\n"
    theirs = _run_mergekit(text, tmp_path / "mk")
    replay_budget = "64M" if method in WHOLE_TENSOR_REPLAYS else "32K"
    ours_art = api.merge(store, text, progress=False, max_memory=replay_budget, arithmetic="mergekit").artifact
    fp32_art = api.merge(store, text, progress=False, max_memory=replay_budget).artifact
    differs_from_fp32 = 0
    with store.open(ours_art.id) as ours, store.open(fp32_art.id) as fp32:
        assert sorted(ours.keys()) == sorted(theirs)
        for name in ours.keys():
            a, b = ours.read(name), theirs[name]
            assert a.dtype == b.dtype == torch.bfloat16
            same = a.view(torch.int16) == b.view(torch.int16)
            if method in THRESHOLD_METHODS:
                assert (~same <= _at_a_threshold(tiny_family, name, method, torch.bfloat16)).all(), name
                assert a.numel() < 1000 or same.float().mean() >= 0.9, (name, same.float().mean())
            else:
                assert same.all(), (name, int((~same).sum()))
            differs_from_fp32 += int((fp32.read(name).view(torch.int16) != a.view(torch.int16)).sum())
    if method != "linear":   # mergekit's linear merge computes in fp32 too; the others round τ to bf16
        assert differs_from_fp32 > 0


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_matches_mergekit(tmp_path, store, tiny_family, method):
    text = RECIPES[method].format(**tiny_family) + "dtype: float32\nout_dtype: float32\n"
    theirs = _run_mergekit(text, tmp_path / "mk")
    ours_art = api.merge(store, text, progress=False, max_memory="64M" if method in WHOLE_TENSOR_REPLAYS else "32K").artifact
    with store.open(ours_art.id) as ours:
        assert sorted(ours.keys()) == sorted(theirs)
        for name in ours.keys():
            a, b = ours.read(name), theirs[name]
            assert a.dtype == b.dtype == torch.float32
            close = torch.isclose(a, b, atol=1e-6, rtol=0)
            if method in THRESHOLD_METHODS:
                tied = _at_a_threshold(tiny_family, name, method)
                assert (~close <= tied).all(), (name, int((~close & ~tied).sum()))  # only ties differ
                assert a.numel() < 1000 or close.float().mean() >= 0.9, (name, close.float().mean())
            else:
                assert close.all(), (name, (a - b).abs().max())
