"""HF directory -> store -> HF directory, byte-identical per tensor; transformers loads the result."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tensorstore_llm import api
from tensorstore_llm.errors import HubUnavailable
from tensorstore_llm.io.hf_dir import HFCheckpointSource
from tensorstore_llm.testing.conformance import same_bits, sample_tensors


def _tensor_bytes(directory):
    """name -> raw bytes of every tensor, read with the reference safetensors library."""
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(directory, f), "pt") as st:
                for k in st.keys():
                    t = st.get_tensor(k)
                    out[k] = (t.dtype, tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return out


def test_every_dtype_round_trips_byte_identical(tmp_path, store):
    src = tmp_path / "src"
    os.makedirs(src)
    tensors = sample_tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text('{"model_type": "test"}')
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    art = api.import_checkpoint(str(src), store, name="all", progress=False).artifact
    out = tmp_path / "out"
    api.export(store, "all", str(out), max_shard_size="2K", progress=False)
    assert _tensor_bytes(src) == _tensor_bytes(out)
    assert (out / "config.json").read_text() == '{"model_type": "test"}'
    assert (out / "tokenizer.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == art.manifest.nbytes
    for name, file in index["weight_map"].items():
        with safe_open(str(out / file), "pt") as st:
            assert name in st.keys()
            assert st.metadata() == {"format": "pt"}


def test_shard_sizes_follow_max_shard_size(tmp_path, store, tiny_family):
    api.import_checkpoint(tiny_family["base"], store, name="b", progress=False)
    api.export(store, "b", str(tmp_path / "o"), max_shard_size="40K", progress=False)
    shards = [f for f in os.listdir(tmp_path / "o") if f.endswith(".safetensors")]
    assert len(shards) > 3 and all(f.startswith("model-") and f"-of-{len(shards):05d}" in f for f in shards)
    for f in shards:
        with safe_open(str(tmp_path / "o" / f), "pt") as st:
            n = sum(st.get_tensor(k).numel() * 2 for k in st.keys())
            assert n <= 40 * 1024 or len(list(st.keys())) == 1
    assert _tensor_bytes(tiny_family["base"]) == _tensor_bytes(tmp_path / "o")


def test_single_file_import(tmp_path, store):
    t = {"x": torch.randn(5, 5).to(torch.bfloat16)}
    save_file(t, str(tmp_path / "w.safetensors"))
    art = api.import_checkpoint(str(tmp_path / "w.safetensors"), store, progress=False).artifact
    assert art.manifest.source["type"] == "safetensors-file"
    with store.open(art.id) as src:
        assert same_bits(src.read("x"), t["x"])


def test_transformers_loads_the_export(tmp_path, store, tiny_family):
    transformers = pytest.importorskip("transformers")
    api.import_checkpoint(tiny_family["ft1"], store, name="ft1", progress=False)
    api.export(store, "ft1", str(tmp_path / "hf"), max_shard_size="100K", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.bfloat16)
    state = model.state_dict()
    with HFCheckpointSource(tiny_family["ft1"]) as src:
        for name in src.keys():
            assert torch.equal(state[name], src.read(name)), name
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, 512) and torch.isfinite(out.float()).all()


def test_convert_changes_dtype_and_config(tmp_path, store, tiny_family):
    api.import_checkpoint(tiny_family["base"], store, name="b", progress=False)
    art = api.convert(store, "b", "fp16", name="b16", max_memory="64K", progress=False).artifact
    assert {r.dtype for r in art.manifest.tensors.values()} == {"float16"}
    with store.open("b") as a, store.open("b16") as b:
        for name in a.keys():
            assert torch.equal(b.read(name), a.read(name).to(torch.float16))
    api.export(store, "b16", str(tmp_path / "o"), progress=False)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["torch_dtype"] == "float16"
    assert art.manifest.parents[0]["id"] == store.resolve("b")


def test_hub_repo_from_the_offline_cache(tmp_path, store, tiny_family, monkeypatch):
    """A real huggingface-hub cache layout on disk, read with HF_HUB_OFFLINE=1."""
    import shutil

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--tiny-llama"
    shutil.copytree(tiny_family["base"], repo / "snapshots" / commit)
    os.makedirs(repo / "refs")
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    art = api.import_checkpoint("acme/tiny-llama", store, name="hub", progress=False).artifact
    assert art.manifest.source == {"type": "hub", "repo": "acme/tiny-llama", "revision": "main", "commit": commit}
    assert _same_tensors(store, "hub", tiny_family["base"])
    with pytest.raises(HubUnavailable, match="acme/absent"):
        api.import_checkpoint("hf://acme/absent", store, progress=False)


def _same_tensors(store, ref, directory):
    with store.open(ref) as a, HFCheckpointSource(directory) as b:
        return sorted(a.keys()) == sorted(b.keys()) and all(same_bits(a.read(k), b.read(k)) for k in a.keys())
