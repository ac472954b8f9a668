"""The issue's bad-input cases for the store-level `tsllm lora` verbs (import, merge, extract,
combine, resize, init, export), each a one-line error with its exit code, naming the file / tensor
and what was expected, with no artifact and no staging left behind: a target module missing from
the base, factor shapes that do not fit it, an adapter bound to another base, a pickled
``adapter_model.bin``, rank 0, a rank above min(out, in), and an existing ``-o`` directory."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from tensorstore_llm.lora.peft_format import build_adapter, write_adapter
from tensorstore_llm.store import Store

SHAPES = {"layers.0.attn.q_proj": (48, 32), "layers.0.mlp.down_proj": (32, 64)}


def _save(tensors, path):
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return path


def _adapter_dir(path, shapes, r=4, gen=None):
    gen = gen or torch.Generator().manual_seed(1)
    factors = {m: (torch.randn(r, s[1], generator=gen), torch.randn(s[0], r, generator=gen)) for m, s in shapes.items()}
    write_adapter(build_adapter(factors, alpha=8.0, fold_scaling=False), str(path))
    return path


@pytest.fixture()
def env(tmp_path, cli):
    """base b0 and another base (directories and artifacts), a good adapter (directory and
    artifact 'ad' bound to b0) and the broken adapter directories."""
    gen = torch.Generator().manual_seed(0)
    base = {f"{m}.weight": torch.randn(*s, generator=gen) for m, s in SHAPES.items()}
    base["embed_tokens.weight"] = torch.randn(40, 32, generator=gen)
    _save(base, tmp_path / "base")
    _save({k: v + 1 for k, v in base.items()}, tmp_path / "other")
    s = str(tmp_path / "store")
    for name in ("base", "other"):
        assert cli("-q", "--store", s, "import", tmp_path / name, "--name", name)[0] == 0
    good = _adapter_dir(tmp_path / "good", SHAPES)
    assert cli("-q", "--store", s, "lora", "import", good, "--base", "base", "--name", "ad")[0] == 0
    bad = {
        "missing": _adapter_dir(tmp_path / "missing", {**SHAPES, "layers.3.attn.q_proj": (48, 32)}),
        "shape": _adapter_dir(tmp_path / "shape", {"layers.0.attn.q_proj": (48, 64)}),
        "pickle": _adapter_dir(tmp_path / "pickle", SHAPES),
        "rank0": _adapter_dir(tmp_path / "rank0", SHAPES),
        "rank33": _adapter_dir(tmp_path / "rank33", {"layers.0.attn.q_proj": (48, 32)}, r=33),
    }
    os.rename(bad["pickle"] / "adapter_model.safetensors", bad["pickle"] / "adapter_model.bin")
    cfg_path = bad["rank0"] / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "r": 0}))
    return tmp_path, s, {k: str(v) for k, v in bad.items()}


CASES = [
    # (verb args, exit code, words in the error)
    (("import", "{missing}", "--base", "base"), 6, "layers.3.attn.q_proj"),
    (("merge", "base", "{missing}"), 6, "layers.3.attn.q_proj"),
    (("import", "{shape}", "--base", "base"), 6, "(48, 32)"),
    (("merge", "base", "{shape}"), 6, "(48, 32)"),
    (("merge", "other", "ad"), 6, "--transfer"),
    (("combine", "ad", "--weights", "1", "--merge-into", "other"), 6, "another base"),
    (("export", "ad", "{tmp}/out", "--base", "other"), 6, "another base"),
    (("import", "{pickle}", "--base", "base"), 4, "pickle"),
    (("merge", "base", "{pickle}"), 4, "pickle"),
    (("combine", "ad", "{pickle}", "--weights", "1,1"), 4, "pickle"),
    (("resize", "{pickle}", "--rank", "2", "--base", "base"), 4, "pickle"),
    (("import", "{rank0}", "--base", "base"), 4, "positive integer rank"),
    (("merge", "base", "{rank0}"), 4, "positive integer rank"),
    (("extract", "{tmp}/other", "--base", "base", "--rank", "0"), 7, "--rank must be >= 1"),
    (("combine", "ad", "--weights", "1", "--rank", "0"), 7, "--rank must be >= 1"),
    (("import", "{rank33}", "--base", "base"), 4, "min(out, in) = 32"),
    (("merge", "base", "{rank33}"), 4, "min(out, in) = 32"),
    (("extract", "{tmp}/other", "--base", "base", "--rank", "33"), 7, "min(out, in) = 32"),
    (("combine", "ad", "ad", "--weights", "1,1", "--rank", "33"), 7, "min(out, in) = 32"),
    (("combine", "ad", "ad", "--weights", "1,1", "--method", "ties", "--rank", "33"), 7, "min(out, in) = 32"),
    # an existing output directory: refused before any work
    (("extract", "{tmp}/other", "--base", "base", "--rank", "2", "-o", "{tmp}/good"), 8, "already exists"),
    (("combine", "ad", "ad", "--weights", "1,1", "--rank", "2", "-o", "{tmp}/good"), 8, "already exists"),
    (("init", "base", "--rank", "2", "-o", "{tmp}/good"), 8, "already exists"),
]


@pytest.mark.parametrize("args,code,words", CASES, ids=[" ".join(c[0][:2]) + f" {c[2]}" for c in CASES])
def test_bad_input_is_a_clear_error_with_nothing_written(env, cli, args, code, words):
    tmp, s, bad = env
    before = sorted(a.id for a in Store(s).list())
    got, _, err = cli("--store", s, "lora", *[a.format(tmp=tmp, **bad) for a in args])
    assert got == code and words in err and err.count("\n") == 1, (got, err)
    assert sorted(a.id for a in Store(s).list()) == before
    assert glob.glob(os.path.join(s, "staging", "*")) == []
    assert not os.path.exists(tmp / "out")
