"""``tsllm lora merge BASE ADAPTER -o DIR`` writes once: the merged tensors stream straight into
the Hugging Face directory (PEFT's load -> merge_and_unload -> save_pretrained gives the same
kind of output), the store keeps a tensorless ``export`` record of the lineage, and the directory
carries a model card naming the base and the adapter. ``--keep-artifact`` keeps the old two-write
path (checkpoint artifact, then export); both give the same bytes. A kill -9 leaves nothing in
DIR's final place, and the rerun resumes to the same bytes.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

peft = pytest.importorskip("peft", reason="PEFT is not installed (pip install -e .[test]); LoRA -o tests skipped")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from tensorstore_llm import __version__  # noqa: E402
from tensorstore_llm.store import Store  # noqa: E402

from helpers import dir_tensors  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(base dir, adapter dir, PEFT's merge_and_unload() state dict) of a small fp32 Llama."""
    root = tmp_path_factory.mktemp("lora-one-write")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(root / "adapter"))
    merged = pm.merge_and_unload().eval()
    return root / "base", root / "adapter", merged


def _files(path) -> dict[str, bytes]:
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


def test_one_write_equals_two_writes_and_peft_and_records_lineage(tmp_path, cli, pair):
    base, adapter, merged = pair
    one, two = tmp_path / "one", tmp_path / "two"
    s1, s2 = str(tmp_path / "store1"), str(tmp_path / "store2")
    code, out, err = cli("--store", s1, "lora", "merge", base, adapter, "--name", "m", "-o", one,
                         "--max-memory", "64M", "--max-shard-size", "200K")
    assert code == 0, err
    assert "lineage record" in out
    code, out, err = cli("--store", s2, "lora", "merge", base, adapter, "--name", "m", "-o", two,
                         "--max-memory", "64M", "--max-shard-size", "200K", "--keep-artifact")
    assert code == 0, err
    assert "checkpoint" in out

    # the same directory, byte for byte: shards, index, carried files and the model card
    files_one, files_two = _files(one), _files(two)
    assert files_one == files_two
    assert len([f for f in files_one if f.endswith(".safetensors")]) > 1 and "model.safetensors.index.json" in files_one
    assert "adapter_config.json" not in files_one      # transformers would load the directory as an adapter

    # PEFT's merge_and_unload(), bit for bit (whole tensors in fp32, as PEFT computes them)
    written = dir_tensors(one)
    expected = merged.state_dict()
    assert sorted(written) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(written[name], value), name

    # the store: a tensorless export record with the lineage, against a stored checkpoint
    record = Store(s1).get("m")
    assert [a.kind for a in Store(s1).list()] == ["export"] and record.manifest.tensors == {}
    assert record.manifest.info["output"] == os.path.abspath(one)
    assert [p["role"] for p in record.manifest.parents] == ["base", "adapter"]
    assert record.manifest.recipe["op"] == "lora_merge" and record.manifest.recipe["adapter"]["ranks"]
    stored = Store(s2).get("m")
    assert [a.kind for a in Store(s2).list()] == ["checkpoint"]
    assert record.manifest.parents == stored.manifest.parents and record.manifest.recipe == stored.manifest.recipe
    for name, (shape, dtype, checksum) in record.manifest.info["tensors"].items():
        assert checksum == stored.manifest.tensors[name].checksum, name
        assert shape == list(written[name].shape) and dtype == "float32"

    # the model card: tool, version, inputs and the adapter's shape
    card = files_one["README.md"].decode()
    assert "tsllm lora merge" in card and __version__ in card
    assert "base: hf-dir `base`" in card and "adapter: peft-adapter `adapter`" in card
    assert "r=8 on 21 modules" in card and "`down_proj`" in card

    # it loads in transformers and gives PEFT's merged model's logits
    model = transformers.AutoModelForCausalLM.from_pretrained(one).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, merged(ids).logits)


def test_bad_output_is_refused_before_any_work(tmp_path, cli, pair):
    base, adapter, _ = pair
    s = str(tmp_path / "store")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    code, _, err = cli("--store", s, "lora", "merge", base, adapter, "-o", taken)
    assert code != 0 and str(taken) in err and err.count("\n") == 1
    assert os.listdir(taken) == ["keep.txt"]
    assert not os.path.exists(os.path.join(s, "artifacts")) or Store(s).list() == []
    code, _, err = cli("--store", s, "lora", "merge", base, adapter, "--keep-artifact")
    assert code != 0 and "--keep-artifact" in err


def _journaled(out) -> int:
    parent, name = os.path.split(str(out))
    most = 0
    for partial in glob.glob(os.path.join(parent, f".{name}.tsllm-partial-*")):
        try:
            with open(os.path.join(partial, "journal.jsonl"), "rb") as f:
                most = max(most, f.read().count(b"\n"))
        except FileNotFoundError:
            pass
    return most


def test_kill_9_leaves_nothing_in_place_and_the_rerun_resumes_to_the_same_bytes(tmp_path, cli, pair):
    base, adapter, _ = pair
    reference = tmp_path / "reference"
    args = ["lora", "merge", str(base), str(adapter), "--max-memory", "64K", "--max-shard-size", "200K"]
    code, _, err = cli("-q", "--store", str(tmp_path / "ref-store"), *args, "-o", reference)
    assert code == 0, err

    s, out = str(tmp_path / "store"), tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "tensorstore_llm_cli", "--store", s, *args, "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while _journaled(out) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, f"the merge ended (rc={proc.returncode}) before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()                        # nothing half-written in the final place
    assert not os.path.exists(os.path.join(s, "artifacts")) or Store(s).list() == []

    code, stdout, err = cli("--store", s, *args, "-o", out)
    assert code == 0, err
    assert int(stdout.split("resumed: ")[1].split()[0]) >= 4
    assert _files(out) == _files(reference)
    assert [a.kind for a in Store(s).list()] == ["export"]
    parent, name = os.path.split(str(out))
    assert glob.glob(os.path.join(parent, f".{name}.tsllm-partial-*")) == []
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(dir_tensors(reference))
