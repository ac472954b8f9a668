"""Layer-level methods: Mediator's conflict analysis and Sens-Merging's sensitivity weights."""
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tensorstore_llm import api
from tensorstore_llm.errors import RecipeError
from tensorstore_llm.io.hf_dir import HFCheckpointSource
from tensorstore_llm.ops.layers import gaussian_threshold, layer_key, sensitivity_weights


def test_layer_keys_and_softmax():
    assert layer_key("model.layers.7.mlp.up_proj.weight") == "7"
    assert layer_key("model.embed_tokens.weight") == "embed"
    assert layer_key("lm_head.weight") == "final" == layer_key("model.norm.weight")
    w = sensitivity_weights({"a": {"0": 2.0}, "b": {"0": 0.0}}, ["a", "b"], "0", 1.0)
    assert w[0] == pytest.approx(math.exp(2) / (math.exp(2) + 1)) and sum(w) == pytest.approx(1)
    assert sensitivity_weights({"a": {}, "b": {}}, ["a", "b"], "0", 1.0) == [0.5, 0.5]
    assert gaussian_threshold([0.5, 0.5, 1.0, 0.5], 1.0)[2] == pytest.approx(0.625 + math.sqrt(0.046875))


@pytest.fixture
def conflicted(tiny_family, tmp_path):
    """ft2 with layer 1's task vector exactly opposite to ft1's (conflict ratio 1 there)."""
    out = tmp_path / "ft2-conflict"
    shutil.copytree(tiny_family["ft2"], out)
    tensors = load_file(str(out / "model.safetensors"))
    with HFCheckpointSource(tiny_family["base"]) as b, HFCheckpointSource(tiny_family["ft1"]) as x:
        for name in tensors:
            if ".layers.1." in name:
                tensors[name] = (2 * b.read(name).float() - x.read(name).float()).to(torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def test_mediator_averages_low_conflict_layers_and_keeps_the_expert_elsewhere(store, tiny_family, conflicted):
    text = (f"merge_method: mediator\nbase_model: {tiny_family['base']}\nmodels:\n  - model: {tiny_family['ft1']}\n"
            f"  - model: {conflicted}\nparameters: {{sigma: 1.0, expert: {tiny_family['ft1']}}}\n")
    result = api.merge(store, text, progress=False)
    layers = {row["layer"]: row for row in result.analysis["layers"]}
    assert layers["1"]["action"] == "expert" and layers["1"]["conflict_ratio"] > 0.95
    assert all(row["action"] == "average" for k, row in layers.items() if k != "1")
    assert result.artifact.manifest.recipe["conflicts"]["layers"] == result.analysis["layers"]
    with store.open(result.artifact.id) as out, HFCheckpointSource(tiny_family["ft1"]) as x, HFCheckpointSource(conflicted) as y:
        for name in out.keys():
            if ".layers.1." in name:
                assert torch.equal(out.read(name), x.read(name)), name
            else:
                expected = ((x.read(name).float() * 1.0 + y.read(name).float() * 1.0) / 2).to(torch.bfloat16)
                assert torch.equal(out.read(name), expected), name


def test_sens_merging_uses_softmaxed_layer_scores(store, tiny_family, tmp_path):
    scores = {tiny_family["ft1"]: {"0": 3.0, "1": 0.0, "embed": 1.0, "final": 1.0},
              tiny_family["ft2"]: {"0": 0.0, "1": 3.0, "embed": 1.0, "final": 1.0}}
    (tmp_path / "s.json").write_text(json.dumps(scores))
    text = (f"merge_method: sens_merging\nbase_model: {tiny_family['base']}\nmodels:\n  - model: {tiny_family['ft1']}\n"
            f"  - model: {tiny_family['ft2']}\nparameters: {{sensitivity: {tmp_path / 's.json'}, temperature: 1.5}}\nout_dtype: float32\n")
    art = api.merge(store, text, progress=False).artifact
    hi = math.exp(3 / 1.5) / (math.exp(3 / 1.5) + 1)
    with store.open(art.id) as out, HFCheckpointSource(tiny_family["base"]) as b, \
            HFCheckpointSource(tiny_family["ft1"]) as x, HFCheckpointSource(tiny_family["ft2"]) as y:
        for name in out.keys():
            a1 = {"0": hi, "1": 1 - hi}.get(layer_key(name), 0.5)
            base = b.read(name).float()
            expected = base + ((x.read(name).float() - base) * a1 + (y.read(name).float() - base) * (1 - a1))
            assert torch.allclose(out.read(name), expected, atol=1e-7), name
    (tmp_path / "bad.json").write_text(json.dumps({tiny_family["ft1"]: {}}))
    with pytest.raises(RecipeError, match="must map every model"):
        api.merge(store, text.replace("s.json", "bad.json"), progress=False)


CORPUS = ["the quick brown fox jumps over the lazy dog", "a merge of two models keeps what each learned",
          "streaming tensors block by block keeps memory small", "layers near the output matter for the task"]


def _with_tokenizer(src, dst):
    """A copy of checkpoint ``src`` with a small trained BPE tokenizer (vocab 512, as the tiny preset)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    shutil.copytree(src, dst)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(dst, "tokenizer.json"))
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}, f)
    return str(dst)


def _direct_sensitivity(model_dir, base_dir, texts):
    """Σ_layer |τ ⊙ ∂L/∂θ| / mean over layers, straight from transformers' own loader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [tok(t, return_tensors="pt")["input_ids"] for t in texts]
    total = sum(i.shape[1] - 1 for i in ids)
    for i in ids:
        (model(input_ids=i, labels=i).loss * (i.shape[1] - 1) / total).backward()
    raw = {}
    with HFCheckpointSource(base_dir) as base:
        for name, p in model.named_parameters():
            tau = p.detach() - base.read(name).float()
            raw[layer_key(name)] = raw.get(layer_key(name), 0.0) + float((tau * p.grad).abs().sum(dtype=torch.float64))
    mean = sum(raw.values()) / len(raw)
    return {k: v / mean for k, v in raw.items()}


def test_sens_merging_computes_scores_from_a_calibration_corpus(store, tiny_family, tmp_path):
    pytest.importorskip("transformers")
    base = _with_tokenizer(tiny_family["base"], tmp_path / "base")
    ft1 = _with_tokenizer(tiny_family["ft1"], tmp_path / "ft1")
    ft2 = _with_tokenizer(tiny_family["ft2"], tmp_path / "ft2")
    # ft2 learned nothing in layer 1: its task vector there is zero, so is its sensitivity
    (weights_file,) = [f for f in os.listdir(ft2) if f.endswith(".safetensors")]
    weights, base_weights = load_file(os.path.join(ft2, weights_file)), load_file(os.path.join(base, weights_file))
    save_file({k: (base_weights[k] if ".layers.1." in k else v) for k, v in weights.items()},
              os.path.join(ft2, weights_file), metadata={"format": "pt"})
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    text = (f"merge_method: sens_merging\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n"
            f"parameters: {{calibration: {tmp_path / 'corpus.jsonl'}, temperature: 0.5}}\nout_dtype: float32\n")
    art = api.merge(store, text, progress=False).artifact
    scores = art.manifest.recipe["sensitivity"]
    for ref in (ft1, ft2):
        direct = _direct_sensitivity(ref, base, CORPUS)
        assert set(scores[ref]) == set(direct) == {"embed", "0", "1", "final"}
        for key in direct:
            assert scores[ref][key] == pytest.approx(direct[key], rel=1e-4, abs=1e-9), (ref, key)
    assert scores[ft2]["1"] == 0 and scores[ft1]["1"] > 0
    with store.open(art.id) as out, HFCheckpointSource(base) as b, HFCheckpointSource(ft1) as x, HFCheckpointSource(ft2) as y:
        for name in out.keys():
            key = layer_key(name)
            e1, e2 = math.exp(scores[ft1][key] / 0.5), math.exp(scores[ft2][key] / 0.5)
            a1 = e1 / (e1 + e2)
            theta0 = b.read(name).float()
            expected = theta0 + ((x.read(name).float() - theta0) * a1 + (y.read(name).float() - theta0) * (1 - a1))
            assert torch.allclose(out.read(name), expected, atol=1e-6), name
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(RecipeError, match="holds no text"):
        api.merge(store, text.replace("corpus.jsonl", "empty.txt"), progress=False)
