"""Helpers several test modules share: the tensors of a checkpoint directory, and a tiny Llama
with a PEFT adapter whose factors are random (PEFT initialises B to zero, which would hide
errors in a merge)."""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file


def dir_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in directory ``path`` (all of a checkpoint's
    shards), in the files' name order."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer transformers Llama (vocabulary 96, hidden 64, 4 query / 2 key-value heads, an
    untied LM head) initialised from ``torch.manual_seed(seed)``, in ``dtype``, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def random_peft_adapter(model, path, config, seed: int = 1):
    """``model`` wrapped by PEFT with ``config``, every LoRA factor and saved module moved by
    0.05 N(0, 1) (seeded), saved to ``path`` with ``save_pretrained``. Returns the PeftModel."""
    import peft

    pm = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(path))
    return pm


def smollm2_or_skip(dtype: str = "bfloat16") -> str:
    """The cached SmolLM2-135M checkpoint directory in ``dtype`` (``testing.real_models``), or a
    pytest skip naming why it is not available on this machine."""
    import pytest

    from tensorstore_llm.errors import FormatError
    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    try:
        return smollm2_checkpoint(dtype)
    except FormatError as e:
        pytest.skip(f"SmolLM2-135M is not available: {e}")
