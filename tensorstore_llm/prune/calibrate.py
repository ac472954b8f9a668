"""Calibration for pruning: the model in transformers, its input feature norms, and its loss.

Wanda's score needs ‖x_j‖, the L2 norm of each input feature of each linear layer over a small
calibration corpus; DarwinLM's search needs the loss of candidate pruned models on samples of it.
Both run the model in fp32 with transformers, so they are for models that fit in memory (the
pruning itself streams). A candidate is evaluated by zeroing what it prunes in the full model
(the o / down columns of removed heads / channels), which gives exactly the pruned model's
outputs (tests/test_prune.py checks the equivalence) without rebuilding modules.
"""
from __future__ import annotations

import os
import tempfile

import torch

from ..errors import DatasetMismatch, FormatError


def load_model(source, files: dict[str, str]):
    """(model in fp32 eval mode, tokenizer) from a TensorSource and its carried files."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if "config.json" not in files:
        raise FormatError(f"{getattr(source, 'path', 'model')}: no config.json, so transformers cannot build the model")
    with tempfile.TemporaryDirectory(prefix="tsllm-calib-") as folder:
        for name, path in files.items():
            with open(path, "rb") as src, open(os.path.join(folder, name), "wb") as dst:
                dst.write(src.read())
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: source.read(name).float() for name in source.keys()}
    result = model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [n for n in result.missing_keys if not (n == "lm_head.weight" and tied)]
    if missing:
        raise FormatError(f"{getattr(source, 'path', 'model')}: weights missing for {missing[:3]}")
    return model.eval(), tokenizer


def token_blocks(tokenizer, texts: list[str], seq_len: int, count: int) -> torch.Tensor:
    """``count`` x ``seq_len`` token ids: the corpus concatenated and cut into blocks, in order."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        if len(ids) >= seq_len * count:
            break
    blocks = len(ids) // seq_len
    if blocks == 0:
        raise DatasetMismatch(f"calibration corpus has {len(ids)} tokens, fewer than one block of {seq_len}")
    blocks = min(blocks, count)
    return torch.tensor(ids[: blocks * seq_len]).reshape(blocks, seq_len)


def input_norms(model, blocks: torch.Tensor, modules: list[str]) -> dict[str, torch.Tensor]:
    """module -> ‖x_j‖ over every calibration token, per input feature (float32)."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    named = dict(model.named_modules())
    for name in modules:
        if name not in named:
            raise FormatError(f"calibration: the model has no module {name!r}")

        def hook(mod, args, _out, name=name):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        hooks.append(named[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            for row in blocks:
                model(input_ids=row[None])
    finally:
        for h in hooks:
            h.remove()
    return {k: v.sqrt().float() for k, v in sums.items()}


def mean_loss(model, blocks: torch.Tensor, batch: int = 4) -> float:
    """Mean next-token cross-entropy of ``model`` over ``blocks``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), batch):
            ids = blocks[start:start + batch]
            loss = model(input_ids=ids, labels=ids).loss
            total += float(loss) * len(ids)
            count += len(ids)
    return total / count


class ZeroedModel:
    """The full model with some MLP channels / KV heads zeroed, switchable between candidates.

    Zeroing the down column of a channel (o columns of a query head group) removes exactly its
    contribution, as pruning it does; original columns are restored before the next candidate.
    """

    def __init__(self, model, arch):
        self.model, self.arch = model, arch
        layers = model.model.layers
        self.down = [layer.mlp.down_proj.weight for layer in layers]
        self.o = [layer.self_attn.o_proj.weight for layer in layers]
        self.saved_down = [w.detach().clone() for w in self.down]
        self.saved_o = [w.detach().clone() for w in self.o]

    def apply(self, pruned_channels: dict[int, list[int]], pruned_heads: dict[int, list[int]]) -> None:
        """Zero the given channels / KV heads (layer -> indices); everything else as in the full model."""
        hd, group = self.arch.head_dim, self.arch.group_size
        with torch.no_grad():
            for i in range(len(self.down)):
                self.down[i].copy_(self.saved_down[i])
                self.o[i].copy_(self.saved_o[i])
                ch = pruned_channels.get(i)
                if ch:
                    self.down[i][:, torch.tensor(ch)] = 0
                for kv in pruned_heads.get(i, []):
                    self.o[i][:, kv * group * hd:(kv + 1) * group * hd] = 0


def corpus_texts(path: str, tokenizer=None) -> list[str]:
    """The documents of a calibration corpus (file or directory)."""
    from ..hf.corpus import read_corpus

    return read_corpus(path, tokenizer=tokenizer).documents


def describe_calibration(path: str, seq_len: int, samples: int) -> dict:
    """What identifies a calibration set in a plan's settings."""
    from ..hf.corpus import read_corpus

    return {"corpus": os.path.basename(os.path.abspath(path)), "fingerprint": read_corpus(path).fingerprint,
            "seq_len": seq_len, "samples": samples}


__all__ = [
    "ZeroedModel",
    "corpus_texts",
    "describe_calibration",
    "input_norms",
    "load_model",
    "mean_loss",
    "token_blocks",
]
