"""Synthetic Llama-shaped checkpoints: deterministic from a seed, tiny to 70B-shaped.

Used by the quickstart, the tests and the benchmarks. A base model's weights are N(0, 0.02)
(norms are ones); a "fine-tune" of it adds N(0, delta_scale) noise, so task vectors are real,
survive bf16 rounding, and every value is regenerated from (seed, tensor, rows) on demand:
writing a 70B-shaped embedding never needs it whole in memory.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace

import torch

from ..dtypes import by_name
from ..io.base import TensorMeta
from ..io.hf_dir import HFCheckpointSink
from ..seeding import normal_rows

BLOCK_ELEMENTS = 8 * 1024 * 1024


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS = {
    "tiny": LlamaShape(64, 176, 2, 4, 2, 512),
    "small": LlamaShape(256, 688, 4, 8, 4, 4096),
    "100m": LlamaShape(768, 2048, 8, 12, 4, 32000),
    "1gb": LlamaShape(2048, 5632, 9, 16, 4, 32000),
    "2gb": LlamaShape(2048, 5632, 20, 16, 4, 32000),
    "70b-1layer": LlamaShape(8192, 28672, 1, 64, 8, 128256),
    "70b-2layer": LlamaShape(8192, 28672, 2, 64, 8, 128256),
}


def shape_of(preset: str, layers: int | None = None) -> LlamaShape:
    """A preset's shape, optionally with another number of layers."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    shape = PRESETS[preset]
    return replace(shape, num_hidden_layers=layers) if layers else shape


def tensor_metas(shape: LlamaShape, dtype: str = "bfloat16") -> list[TensorMeta]:
    """The tensors of a Llama checkpoint of ``shape``, in Hugging Face naming and order."""
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    kv = shape.num_key_value_heads * shape.head_dim
    metas = [TensorMeta("model.embed_tokens.weight", (v, h), dtype)]
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}."
        metas += [
            TensorMeta(p + "input_layernorm.weight", (h,), dtype),
            TensorMeta(p + "self_attn.q_proj.weight", (h, h), dtype),
            TensorMeta(p + "self_attn.k_proj.weight", (kv, h), dtype),
            TensorMeta(p + "self_attn.v_proj.weight", (kv, h), dtype),
            TensorMeta(p + "self_attn.o_proj.weight", (h, h), dtype),
            TensorMeta(p + "post_attention_layernorm.weight", (h,), dtype),
            TensorMeta(p + "mlp.gate_proj.weight", (i, h), dtype),
            TensorMeta(p + "mlp.up_proj.weight", (i, h), dtype),
            TensorMeta(p + "mlp.down_proj.weight", (h, i), dtype),
        ]
    metas += [TensorMeta("model.norm.weight", (h,), dtype), TensorMeta("lm_head.weight", (v, h), dtype)]
    return metas


def llama_config(shape: LlamaShape, dtype: str = "bfloat16") -> dict:
    """A ``config.json`` that transformers' LlamaForCausalLM accepts for ``shape``."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **asdict(shape),
            "head_dim": shape.head_dim, "hidden_act": "silu", "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": by_name(dtype).name, "initializer_range": 0.02, "use_cache": True}


def tensor_rows(meta: TensorMeta, start: int, stop: int, seed: int, finetune: int = 0,
                delta_scale: float = 0.002) -> torch.Tensor:
    """Rows ``start:stop`` of tensor ``meta`` of the model (seed, finetune); 0 is the base model."""
    shape = tuple(meta.shape)
    if meta.name.endswith("norm.weight"):
        values = torch.ones((stop - start, *shape[1:]))
    else:
        values = normal_rows(seed, "synth-base", meta.name, shape, start, stop) * 0.02
    if finetune:
        values = values + normal_rows(seed, f"synth-ft{finetune}", meta.name, shape, start, stop) * delta_scale
    return values.to(by_name(meta.dtype).torch)


def write_checkpoint(out_dir: str, preset: str = "tiny", *, seed: int = 0, finetune: int = 0,
                     delta_scale: float = 0.002, dtype: str = "bfloat16", layers: int | None = None,
                     max_shard_size: int = 2 * 1024**3) -> str:
    """Write a synthetic Llama checkpoint as a Hugging Face directory.

    Args:
        preset: one of ``PRESETS`` (``tiny`` ... ``1gb`` ... ``70b-2layer``).
        finetune: 0 for the base model, k > 0 for the k-th fine-tune of it.
    Returns:
        ``out_dir``.
    Example:
        >>> write_checkpoint("base", "tiny"); write_checkpoint("ft1", "tiny", finetune=1)  # doctest: +SKIP
    """
    shape = shape_of(preset, layers)
    config = json.dumps(llama_config(shape, dtype), indent=2).encode()
    generation = json.dumps({"bos_token_id": 1, "eos_token_id": 2}).encode()
    metas = tensor_metas(shape, dtype)
    sink = HFCheckpointSink(out_dir, max_shard_bytes=max_shard_size, job_key=f"synth-{seed}-{finetune}",
                            files={"config.json": config, "generation_config.json": generation})
    sink.prepare(metas)
    done = sink.completed()
    for meta in metas:
        if meta.name in done:
            continue
        rows = max(1, BLOCK_ELEMENTS // max(1, meta.row_numel))
        for start in range(0, meta.rows, rows):
            stop = min(meta.rows, start + rows)
            sink.write_rows(meta.name, start, tensor_rows(meta, start, stop, seed, finetune, delta_scale))
        sink.finish(meta.name)
    return sink.commit()


def write_model_family(root: str, preset: str = "tiny", *, seed: int = 0, finetunes: int = 2, **kw) -> list[str]:
    """Write ``base`` and ``ft1`` .. ``ftN`` under ``root``; returns their directories."""
    dirs = [write_checkpoint(os.path.join(root, "base"), preset, seed=seed, **kw)]
    for k in range(1, finetunes + 1):
        dirs.append(write_checkpoint(os.path.join(root, f"ft{k}"), preset, seed=seed, finetune=k, **kw))
    return dirs
