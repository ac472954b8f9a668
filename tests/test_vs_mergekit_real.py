"""Every merge method tsllm and mergekit both have, on real SmolLM2-135M weights from two real
fine-tunes (8 AdamW steps each on two different texts, shared with test_seed_methods' cache).

Cheap by design: a handful of real tensors (an attention projection, an MLP projection, a norm
and the first 1,536 rows of the embedding, each under mergekit's 10⁶-entry quantile-sampling
size) are written as three small checkpoints; tsllm merges them with ``api.merge`` on a recipe
(streamed, at a budget that splits the large tensors), mergekit runs its merge-method code
directly on the same tensors (``mergekit.merge_methods.registry.get(name)(groups, ...)``, the
kernels its ``run_merge`` calls), and every entry is compared.

Tolerances (fp32): 1e-6 + 1e-5·|value| for the deterministic methods (fp32 rounding of the same
formula in another order, or of coefficients mergekit computes in fp32 and tsllm in fp64); karcher 1e-3 (mergekit's fp32 cosines of nearly
parallel unit vectors lose the angle, see docs/benchmarks.md; ours matches a float64 iteration in
test_newer_methods.py); the top-k methods may differ only at entries tied with the cut (mergekit
keeps an arbitrary subset of tied entries). bf16 with ``arithmetic="mergekit"``: bit-exact for every
replayed deterministic method (ties / breadcrumbs: except at the tied cut). DARE and DELLA draw
their masks from different generators (mergekit: the global torch RNG), so no seed makes them
comparable entry by entry; they are compared by what a mask may produce: each entry either the
base or base + weight·τ·(L1 rescale), a kept share within 5 standard deviations of the density in
both tools, and DELLA's preference for large magnitudes in both.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (pip install mergekit): real-pair comparison skipped")
pytest.importorskip("transformers", reason="transformers is not installed: the real SmolLM2 pair cannot be made")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tensorstore_llm import api  # noqa: E402

TENSORS = {   # output name -> (checkpoint name, rows kept)
    "model.layers.3.self_attn.q_proj.weight": ("model.layers.3.self_attn.q_proj.weight", None),
    "model.layers.5.mlp.down_proj.weight": ("model.layers.5.mlp.down_proj.weight", None),
    "model.layers.5.input_layernorm.weight": ("model.layers.5.input_layernorm.weight", None),
    "model.embed_tokens.weight": ("model.embed_tokens.weight", 1536),
}
BUDGET = "6M"   # splits the 0.9 M-entry tensors into row blocks
WHOLE_TENSOR_BUDGET = "64M"   # nuslerp's and model_stock's bf16 replays hold a tensor


@pytest.fixture(scope="module")
def real_tensors(tmp_path_factory):
    """{"base", "a", "b"} -> {name: fp32 tensor}, and per dtype the three checkpoint directories."""
    if os.environ.get("TSLLM_SKIP_REAL"):
        pytest.skip("TSLLM_SKIP_REAL is set")
    from test_seed_methods import _task_finetune

    from tensorstore_llm.errors import FormatError
    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    try:
        base_dir = smollm2_checkpoint("float32")
    except FormatError as e:   # SmolLM2 is not installed here
        pytest.skip(f"SmolLM2-135M is not available: {e}")
    dirs = {"base": base_dir, "a": _task_finetune("a"), "b": _task_finetune("b")}
    tensors = {}
    for key, path in dirs.items():
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            tensors[key] = {name: (f.get_tensor(src) if rows is None else f.get_slice(src)[:rows]).float().contiguous()
                            for name, (src, rows) in TENSORS.items()}
    with open(os.path.join(base_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["vocab_size"] = TENSORS["model.embed_tokens.weight"][1]
    root = tmp_path_factory.mktemp("real-subset")
    out = {"tensors": tensors}
    for dtype in (torch.float32, torch.bfloat16):
        for key in dirs:
            target = root / f"{key}-{str(dtype)[6:]}"
            target.mkdir()
            save_file({n: t.to(dtype) for n, t in tensors[key].items()}, str(target / "model.safetensors"))
            (target / "config.json").write_text(json.dumps({**config, "torch_dtype": str(dtype)[6:]}))
            out[(key, dtype)] = str(target)
    return out


# case -> (tsllm recipe body with {base} {a} {b}, mergekit method, mergekit's inputs in order (B: the
# base entry), mergekit parameters)
CASES = {
    "linear": ("models:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n  - model: {b}\n    parameters: {{weight: 0.4}}\n",
               "linear", "a b", {"weight": [0.7, 0.4]}),
    "task_arithmetic": (("base_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n"
                         "  - model: {b}\n    parameters: {{weight: 0.9}}\nparameters: {{lambda: 0.8}}\n"),
                        "task_arithmetic", "B a b", {"weight": [0.7, 0.9], "lambda": 0.8}),
    "ties": (("base_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0, density: 0.4}}\n"
              "  - model: {b}\n    parameters: {{weight: 0.6, density: 0.7}}\n"),
             "ties", "B a b", {"weight": [1.0, 0.6], "density": [0.4, 0.7]}),
    "breadcrumbs": (("base_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0, density: 0.5, gamma: 0.05}}\n"
                     "  - model: {b}\n    parameters: {{weight: 0.5, density: 0.6, gamma: 0.01}}\n"),
                    "breadcrumbs", "B a b", {"weight": [1.0, 0.5], "density": [0.5, 0.6], "gamma": [0.05, 0.01]}),
    "slerp": ("base_model: {base}\nmodels:\n  - model: {a}\nparameters: {{t: 0.3}}\n", "slerp", "B a", {"t": 0.3}),
    "nuslerp": ("models:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n  - model: {b}\n    parameters: {{weight: 3.0}}\n",
                "nuslerp", "a b", {"weight": [1.0, 3.0]}),
    "model_stock": ("base_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n", "model_stock", "B a b", {}),
    "multislerp": (("base_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"
                    "  - model: {b}\n    parameters: {{weight: 2.0}}\n"), "multislerp", "B a b", {"weight": [1.0, 2.0]}),
    "karcher": ("models:\n  - model: {a}\n  - model: {b}\n  - model: {base}\n", "karcher", "a b base", {}),
    "sce": ("base_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n", "sce", "B a b", {}),
    "sce_topk": ("base_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{select_topk: 0.5}}\n",
                 "sce", "B a b", {"select_topk": 0.5}),
    "nearswap": ("base_model: {base}\nmodels:\n  - model: {a}\nparameters: {{t: 0.0001}}\n", "nearswap", "B a", {"t": 0.0001}),
    "nearswap_far": ("base_model: {base}\nmodels:\n  - model: {a}\nparameters: {{t: 2.5}}\n", "nearswap", "B a", {"t": 2.5}),
    "arcee_fusion": ("base_model: {base}\nmodels:\n  - model: {a}\n", "arcee_fusion", "B a", {}),
    "ram": ("base_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{epsilon: 0.0001}}\n",
            "ram", "B a b", {"epsilon": 0.0001}),
    "ramplus_tl": ("base_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{epsilon: 0.0001, r: 0.5, alpha: 0.6}}\n",
                   "ramplus_tl", "B a b", {"epsilon": 0.0001, "r": 0.5, "alpha": 0.6}),
    "passthrough": ("models:\n  - model: {a}\n    parameters: {{scale: 0.5}}\n", "passthrough", "a", {"scale": [0.5]}),
}
TOLERANCE = {"karcher": 1e-3}
TOP_K = {"ties": ("magnitude", [(0.4, 0.0), (0.7, 0.0)]), "breadcrumbs": ("outliers", [(0.5, 0.05), (0.6, 0.01)])}
NOT_REPLAYED = {"slerp", "multislerp", "karcher", "passthrough"}   # no bf16 replay in tsllm (computed in fp32)


def _members(case):
    """mergekit's group for ``case``: (checkpoint key, is the base entry) per input, in order."""
    return [("base", True) if m == "B" else (m, False) for m in CASES[case][2].split()]


def _mergekit(case, tensors, dtype):
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get

    _, name, _, params = CASES[case]
    members = _members(case)
    groups = [TensorGroup.from_tensors([tensors[k][n].to(dtype) for k, _ in members],
                                       base_index=next((i for i, (_, b) in enumerate(members) if b), None), name=n)
              for n in TENSORS]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # mergekit's own bf16 result depends on how torch splits a whole-tensor
    try:                       # reduction (nuslerp's norms: 305,771 entries of down_proj move at 2 threads);
        merged = get(name)(groups, parameters=params, dtype=dtype, out_dtype=dtype)   # tsllm's tiles run on one
    finally:
        torch.set_num_threads(threads)
    return dict(zip(TENSORS, merged))


def _ours(store, case, dirs, dtype, arithmetic="fp32"):
    body = CASES[case][0].format(**{k: dirs[(k, dtype)] for k in ("base", "a", "b")})
    method = CASES[case][1]
    text = f"merge_method: {method}\n{body}dtype: {str(dtype)[6:]}\nout_dtype: {str(dtype)[6:]}\n"
    whole = arithmetic == "mergekit" and method in ("nuslerp", "model_stock")
    result = api.merge(store, text, progress=False, max_memory=WHOLE_TENSOR_BUDGET if whole else BUDGET, arithmetic=arithmetic)
    with store.open(result.artifact.id) as out:
        assert sorted(out.keys()) == sorted(TENSORS)
        return {n: out.read(n) for n in TENSORS}, result


def _at_the_cut(case, tensors, name, dtype):
    """Entries whose |τ| equals one of the magnitudes where a top-k method cuts (τ in ``dtype``)."""
    kind, specs = TOP_K[case]
    base = tensors["base"][name].to(dtype)
    tied = torch.zeros(base.shape, dtype=torch.bool)
    for key, (density, gamma) in zip(("a", "b"), specs):
        tau = (tensors[key][name].to(dtype) - base).float().abs()
        n = tau.numel()
        target = max(1, int(density * n)) if kind == "magnitude" else int(density * n)
        cuts = [target] if kind == "magnitude" else [n - max(0, n - target - int(gamma * n)) - target]
        cuts += [] if kind == "magnitude" else [cuts[0] + target]
        for k in cuts:
            if 0 < k <= n:
                tied |= tau == tau.reshape(-1).kthvalue(n - k + 1).values
    return tied


def _variance_at_the_cut(tensors, name, select_topk):
    """Entries whose variance across the task vectors equals SCE's k-th largest (where mergekit's
    torch.topk and tsllm's flat-index order may keep different entries)."""
    base = tensors["base"][name]
    variance = torch.var(torch.stack([tensors[k][name] - base for k in ("a", "b")]), dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * select_topk)
    return variance == variance.reshape(-1).sort(descending=True).values[k - 1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp32_agrees_with_mergekit_on_real_tensors(store, real_tensors, case):
    tensors = real_tensors["tensors"]
    ours, result = _ours(store, case, real_tensors, torch.float32)
    assert max(j.blocks for j in result.estimate.jobs) > 1, "the budget should stream the large tensors in row blocks"
    theirs = _mergekit(case, tensors, torch.float32)
    atol = TOLERANCE.get(case, 1e-6)
    for name in TENSORS:
        a, b = ours[name], theirs[name]
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape, name
        close = torch.isclose(a, b, atol=atol, rtol=1e-5)
        if case in TOP_K:
            assert (~close <= _at_the_cut(case, tensors, name, torch.float32)).all(), (name, int((~close).sum()))
        elif case == "sce_topk":
            assert (~close <= _variance_at_the_cut(tensors, name, 0.5)).all(), (name, int((~close).sum()))
        else:
            assert close.all(), (case, name, float((a - b).abs().max()), int((~close).sum()))
    changed = sum(int((ours[n] != tensors["base"][n]).sum()) for n in TENSORS)
    assert changed > 0    # the merge moved weights (real fine-tunes differ from the base)


@pytest.mark.parametrize("case", sorted(set(CASES) - NOT_REPLAYED - {"sce_topk"}))
def test_bf16_replay_is_bit_exact_with_mergekit_on_real_tensors(store, real_tensors, case):
    """sce_topk is left out: on bf16 task vectors the variances tie at the cut in most tensors,
    mergekit's torch.topk keeps an arbitrary subset of them and the changed weights move the whole
    tensor by an ulp (the tie rule is tested against mergekit in test_newer_methods.py)."""
    tensors = real_tensors["tensors"]
    ours, _ = _ours(store, case, real_tensors, torch.bfloat16, arithmetic="mergekit")
    bf16 = {k: {n: t.to(torch.bfloat16) for n, t in v.items()} for k, v in tensors.items()}
    theirs = _mergekit(case, bf16, torch.bfloat16)
    for name in TENSORS:
        a, b = ours[name], theirs[name]
        assert a.dtype == b.dtype == torch.bfloat16, name
        same = a.view(torch.int16) == b.view(torch.int16)
        if case in TOP_K:
            assert (~same <= _at_the_cut(case, tensors, name, torch.bfloat16)).all(), (name, int((~same).sum()))
        else:
            assert same.all(), (case, name, int((~same).sum()))


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_masks_have_the_same_law_as_mergekit(store, real_tensors, method):
    """One model, density 0.3, weight 0.8 (not normalised), survivors rescaled to the task
    vector's L1 norm (the only rescaling mergekit has; tsllm's ``rescale_method: l1``): in both
    tools every entry is the base or base + 0.8·τ·(|τ|₁ / |kept τ|₁), and both keep a share within
    5σ of 0.3. DELLA (epsilon 0.15) keeps the larger half of each row's magnitudes more often
    than the smaller half in both (DARE: no such preference)."""
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get

    tensors, density, weight = real_tensors["tensors"], 0.3, 0.8
    della = method.startswith("della")
    extra = ", epsilon: 0.15" if della else ""
    body = (f"base_model: {real_tensors[('base', torch.float32)]}\nmodels:\n  - model: {real_tensors[('a', torch.float32)]}\n"
            f"    parameters: {{weight: {weight}, density: {density}{extra}}}\n")
    result = api.merge(store, f"merge_method: {method}\n{body}dtype: float32\nparameters: {{rescale_method: l1, normalize: false}}\n",
                       progress=False, max_memory=BUDGET)
    torch.manual_seed(0)
    groups = [TensorGroup.from_tensors([tensors["base"][n], tensors["a"][n]], base_index=0, name=n) for n in TENSORS]
    params = {"weight": [weight], "density": [density], "normalize": False, **({"epsilon": [0.15]} if della else {})}
    theirs = dict(zip(TENSORS, get(method)(groups, parameters=params, dtype=torch.float32)))
    with store.open(result.artifact.id) as out:
        for name in TENSORS:
            base, tau = tensors["base"][name], tensors["a"][name] - tensors["base"][name]
            rows = tau.reshape(-1, tau.shape[-1]) if tau.dim() > 1 else tau.reshape(1, -1)
            upper = rows.abs() > rows.abs().median(dim=1, keepdim=True).values
            for tool, merged in (("tsllm", out.read(name)), ("mergekit", theirs[name])):
                kept = merged != base
                ratio = float(tau.double().abs().sum() / tau[kept].double().abs().sum())
                expected = torch.where(kept, base + weight * tau * ratio, base)
                assert torch.allclose(merged, expected, atol=1e-6, rtol=1e-5), (tool, name)
                share, n = int(kept.sum()) / int((tau != 0).sum()), int((tau != 0).sum())
                assert abs(share - density) < 5 * math.sqrt(density * (1 - density) / n), (tool, name, share)
                kept_rows = kept.reshape(rows.shape)
                top, low = kept_rows[upper].float().mean(), kept_rows[~upper].float().mean()
                spread = 5 * math.sqrt(density * (1 - density) / (n / 2))
                assert (top - low > 0.1) if della else (abs(top - low) < 2 * spread), (tool, name, float(top), float(low))
