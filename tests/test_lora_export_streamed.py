"""``lora export`` streams: the adapter artifact is written one tensor at a time
(``peft_io.write_adapter_streamed``), and the two files are byte for byte what the in-memory
path writes (the whole adapter read back, then ``write_adapter``: safetensors' own
``save_file``), for LoRA with DoRA magnitudes, biases, rank patterns, embedding factors and saved
modules of several dtypes, and for prefix tuning. Bad input: FormatError, nothing written."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from tensorstore_llm.errors import FormatError
from tensorstore_llm.lora.artifacts import (
    DictSource,
    adapter_info,
    commit_adapter,
    export_adapter,
    read_adapter_artifact,
)
from tensorstore_llm.lora.peft_format import (
    CONFIG_FILE,
    PREFIX,
    WEIGHTS_FILE,
    PrefixAdapter,
    build_adapter,
    write_adapter,
)
from tensorstore_llm.lora.peft_io import write_adapter_streamed
from tensorstore_llm.store import Store

UNBOUND = {"id": None, "external": None, "checksums": {}}


def _lora(gen, dtype):
    """Two linear modules of different ranks (a rank pattern), one embedding LoRA, a DoRA
    magnitude and a bias, and saved modules in five other dtypes."""
    factors = {"model.layers.0.q_proj": (torch.randn(4, 24, generator=gen), torch.randn(16, 4, generator=gen)),
               "model.layers.1.down_proj": (torch.randn(2, 40, generator=gen), torch.randn(24, 2, generator=gen)),
               "model.embed_tokens": (torch.randn(4, 30, generator=gen), torch.randn(24, 4, generator=gen))}
    adapter = build_adapter(factors, alpha=8.0, kinds={"model.embed_tokens": "embedding"}, dtype=dtype)
    adapter.modules["model.layers.0.q_proj"].magnitude = torch.rand(16, generator=gen).to(torch.bfloat16)
    adapter.modules["model.layers.1.down_proj"].bias = torch.randn(24, generator=gen).to(dtype)
    adapter.saved_modules = {"lm_head.weight": torch.randn(30, 24, generator=gen).to(torch.float16),
                             "score.weight": torch.randn(3, 24, generator=gen).double(),
                             "pos.weight": torch.randint(0, 9, (5,), generator=gen),
                             "mask.weight": torch.rand(7, generator=gen) > 0.5,
                             "codes.weight": torch.randint(0, 255, (6,), generator=gen).to(torch.uint8)}
    return adapter


def _files(path):
    with open(os.path.join(path, CONFIG_FILE), "rb") as f, open(os.path.join(path, WEIGHTS_FILE), "rb") as g:
        return f.read(), g.read()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_streams_the_bytes_of_the_in_memory_path(tmp_path, dtype):
    store = Store(str(tmp_path / "store"))
    adapter = _lora(torch.Generator().manual_seed(0), dtype)
    art = commit_adapter(store, adapter, info=adapter_info(adapter, UNBOUND))
    in_memory, _ = read_adapter_artifact(store, art.id)
    write_adapter(in_memory, str(tmp_path / "reference"))
    assert export_adapter(store, art.id, str(tmp_path / "streamed")) == str(tmp_path / "streamed")
    assert _files(tmp_path / "streamed") == _files(tmp_path / "reference")
    # and the reference is safetensors' own file of the adapter's tensors
    save_file(adapter.state_dict(), str(tmp_path / "direct.safetensors"), metadata={"format": "pt"})
    assert _files(tmp_path / "streamed")[1] == (tmp_path / "direct.safetensors").read_bytes()


def test_prefix_tuning_export_streams_the_same_bytes(tmp_path):
    store = Store(str(tmp_path / "store"))
    config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 5, "num_layers": 2, "token_dim": 32,
              "task_type": "CAUSAL_LM"}
    embeddings = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    prefix = PrefixAdapter(config=config, prompt_embeddings=embeddings)
    art = commit_adapter(store, prefix, info=adapter_info(prefix, UNBOUND))
    write_adapter(read_adapter_artifact(store, art.id)[0], str(tmp_path / "reference"))
    export_adapter(store, art.id, str(tmp_path / "streamed"))
    assert _files(tmp_path / "streamed") == _files(tmp_path / "reference")


def test_streamed_write_refuses_a_bad_adapter_before_writing(tmp_path):
    adapter = _lora(torch.Generator().manual_seed(2), torch.float32)
    config = adapter.config.to_dict()
    config["r"] = 3          # the factors of rank 4 no longer match the configured rank
    config["rank_pattern"] = {}
    tensors = DictSource(adapter.state_dict())
    with pytest.raises(FormatError, match=r"artifact x.*configured rank r=3"):
        write_adapter_streamed(config, tensors, str(tmp_path / "out"), where="artifact x")
    assert not os.path.exists(tmp_path / "out") and os.listdir(tmp_path) == []
    # a tensor missing from a module: named with its PEFT key
    del tensors.tensors[PREFIX + "model.layers.0.q_proj.lora_B.weight"]
    with pytest.raises(FormatError, match=r"q_proj\.lora_B\.weight is missing"):
        write_adapter_streamed(adapter.config.to_dict(), tensors, str(tmp_path / "out"), where="artifact x")
    assert os.listdir(tmp_path) == []
