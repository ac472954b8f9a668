"""Pruning plans and pruned checkpoints on a synthetic Llama (fp32): exactness in transformers,
masks against direct formulas, ops through the conformance base, and bad input."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tensorstore_llm import api
from tensorstore_llm.errors import BaseMismatch, InvalidParameter
from tensorstore_llm.prune import load_plan, prune
from tensorstore_llm.prune.apply import NonUniformLayers
from tensorstore_llm.testing.conformance import OpConformance
from tensorstore_llm.testing.synth import write_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def fp32_models(tmp_path_factory):
    """Two different fp32 'small' synthetic Llamas (8 heads, 4 KV heads, 688 channels, 4 layers)."""
    root = tmp_path_factory.mktemp("prune-models")
    a = write_checkpoint(str(root / "a"), "small", dtype="float32", seed=0)
    b = write_checkpoint(str(root / "b"), "small", dtype="float32", seed=1)
    return a, b


def _count(store):
    return len(store.list()) if os.path.isdir(store.root) else 0


def test_uniform_prune_is_exact_in_transformers(fp32_models, store, tmp_path):
    base = fp32_models[0]
    api.import_checkpoint(base, store, name="base", progress=False)
    out = str(tmp_path / "pruned-hf")
    result = prune(store, "base", ratio=0.4, head_ratio=0.5, name="small", out_dir=out, max_memory="4M", progress=False)
    plan = result.plan
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["intermediate_size"], config["num_key_value_heads"], config["num_attention_heads"]) == (413, 2, 4)
    assert config["head_dim"] == 32
    pruned = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    full = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    hd, group = 32, 2
    with torch.no_grad():
        for i, layer in enumerate(full.model.layers):
            layer.mlp.down_proj.weight[:, plan.pruned("down", i)] = 0
            layer.self_attn.o_proj.weight[:, plan.pruned("o", i)] = 0
            assert len(plan.pruned("o", i)) == 4 * hd and len(plan.pruned("down", i)) == 688 - 413
        ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
        got, want = pruned(input_ids=ids).logits, full(input_ids=ids).logits
    assert torch.allclose(got, want, atol=2e-5, rtol=0), (got - want).abs().max()
    # the pruned weights are bit-for-bit gathers of the full ones
    w = full.model.layers[1].self_attn.k_proj.weight
    kept = plan.rows("k", 1)
    assert torch.equal(pruned.model.layers[1].self_attn.k_proj.weight, w[kept])
    assert [kv for kv in plan.kept_kv_heads(1)] == [kv for kv in plan.kv_heads[1]]
    assert len(plan.kept_q_heads(1)) == len(plan.kept_kv_heads(1)) * group
    # scores by magnitude: the kept channels are the highest-norm ones of layer 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    norms = (ref["model.layers.0.mlp.gate_proj.weight"].double() ** 2).sum(1) + \
        (ref["model.layers.0.mlp.up_proj.weight"].double() ** 2).sum(1) + \
        (ref["model.layers.0.mlp.down_proj.weight"].double() ** 2).sum(0)
    top = set(torch.sort(norms, descending=True, stable=True).indices[:413].tolist())
    assert set(plan.kept_channels(0)) == top


def test_plan_artifact_round_trip_and_index_import(fp32_models, store, tmp_path):
    api.import_checkpoint(fp32_models[0], store, name="base", progress=False)
    result = prune(store, "base", ratio=0.25, head_ratio=0.25, name="p", progress=False)
    plan, artifact = load_plan(store, "p-plan")
    assert artifact.manifest.info_schema == "pruning_plan/2"
    assert plan.channels == result.plan.channels and plan.kv_heads == result.plan.kv_heads
    assert artifact.manifest.info["base"]["id"] == store.get("base").id
    index = {"layers": {str(i): {"pruned_channels": plan.pruned("down", i),
                                 "kept_kv_heads": list(plan.kept_kv_heads(i))} for i in range(4)}}
    path = tmp_path / "index.json"
    path.write_text(json.dumps(index))
    imported = prune(store, "base", method="index", index_file=str(path), name="q", progress=False)
    assert imported.plan.channels == plan.channels and imported.plan.kv_heads == plan.kv_heads
    with store.open("p") as a, store.open("q") as b:
        for name in a.keys():
            assert torch.equal(a.read(name), b.read(name)), name


def test_masks_match_direct_formulas(fp32_models, store):
    api.import_checkpoint(fp32_models[0], store, name="base", progress=False)
    prune(store, "base", pattern="2:4", name="m24", max_memory="8M", progress=False)
    prune(store, "base", pattern="unstructured", ratio=0.6, name="u60", max_memory="8M", progress=False)
    with store.open("base") as base, store.open("m24") as m24, store.open("u60") as u60:
        w = base.read("model.layers.2.mlp.up_proj.weight")
        got = m24.read("model.layers.2.mlp.up_proj.weight")
        groups = w.reshape(w.shape[0], -1, 4)
        top2 = groups.abs().topk(2, dim=-1).indices
        want = torch.zeros_like(groups).scatter(-1, top2, groups.gather(-1, top2)).reshape(w.shape)
        assert torch.equal(got, want)
        got = u60.read("model.layers.2.mlp.up_proj.weight")
        kept = w.shape[1] - round(0.6 * w.shape[1])
        thresh = w.abs().sort(dim=1, descending=True).values[:, kept - 1:kept]
        assert torch.equal(got, torch.where(w.abs() >= thresh, w, torch.zeros_like(w)))
        assert torch.equal(m24.read("model.embed_tokens.weight"), base.read("model.embed_tokens.weight"))


def test_bad_inputs_write_nothing(fp32_models, store, cli, tmp_path):
    api.import_checkpoint(fp32_models[0], store, name="base", progress=False)
    api.import_checkpoint(fp32_models[1], store, name="other", progress=False)
    prune(store, "base", ratio=0.5, name="p", progress=False)
    before = _count(store)
    code, _, err = cli("--store", store.root, "prune", "base", "--ratio", "1.0")
    assert code == 7 and "[0, 1)" in err
    with pytest.raises(InvalidParameter, match="every one of its 4 units"):
        prune(store, "base", ratio=0.1, head_ratio=0.9, progress=False)
    with pytest.raises(BaseMismatch, match="another base"):
        prune(store, "other", from_plan="p-plan", progress=False)
    code, _, err = cli("--store", store.root, "prune", "other", "--plan", "p-plan")
    assert code == 6 and "another base" in err
    per_layer = tmp_path / "per-layer.json"
    per_layer.write_text(json.dumps({"mlp": [0.1, 0.5, 0.5, 0.2]}))
    with pytest.raises(NonUniformLayers, match="intermediate_size"):
        prune(store, "base", per_layer=str(per_layer), out_dir=str(tmp_path / "x"), progress=False)
    assert not os.path.exists(tmp_path / "x")
    assert _count(store) == before
    result = prune(store, "base", per_layer=str(per_layer), progress=False)   # without -o: the plan only
    assert result.checkpoint is None and result.notes and not result.plan.uniform
    assert [s["intermediate_size"] for s in result.plan.layer_sizes()] == [619, 344, 344, 550]


ROWS = 1000   # enough for the conformance base's small budget to split every op into row blocks


class TestGatherRows(OpConformance):
    op = "gather_rows"
    whole = ("x",)
    params = {"index": list(reversed(range(300)))}   # a permutation keeps the output shape of the input

    def make_inputs(self, gen):
        return {"x": torch.randn(300, 24, generator=gen)}

    def golden(self, inputs, params):
        return inputs["x"][list(params["index"])]


class TestGatherColumns(OpConformance):
    op = "gather_columns"
    params = {"index": [5, 3, 1, 0, 2, 4] * 4}

    def make_inputs(self, gen):
        return {"x": torch.randn(ROWS, 24, generator=gen)}

    def golden(self, inputs, params):
        return inputs["x"][:, list(params["index"])]


class TestNMMask(OpConformance):
    op = "prune_mask"
    params = {"pattern": "n:m", "n": 4, "m": 8}

    def make_inputs(self, gen):
        return {"x": torch.randn(ROWS, 24, generator=gen)}

    def golden(self, inputs, params):
        x = inputs["x"].reshape(ROWS, 3, 8)
        keep = x.abs() >= x.abs().sort(dim=-1, descending=True).values[..., 3:4]
        return torch.where(keep, x, torch.zeros_like(x)).reshape(ROWS, 24)


class TestWandaMask(OpConformance):
    op = "prune_mask_wanda"
    params = {"pattern": "unstructured", "sparsity": 0.5}
    whole = ("norm",)

    def make_inputs(self, gen):
        return {"x": torch.randn(ROWS, 24, generator=gen), "norm": torch.rand(24, generator=gen) + 0.1}

    def golden(self, inputs, params):
        x, s = inputs["x"], inputs["x"].abs() * inputs["norm"]
        keep = s >= s.sort(dim=1, descending=True).values[:, 11:12]
        return torch.where(keep, x, torch.zeros_like(x))
