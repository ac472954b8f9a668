"""LoRA adapters: PEFT format, artifacts bound to their base, merge, combine, extract, resize, SVD init.

- :mod:`.peft_format` / :mod:`.peft_io`: PEFT adapters (LoRA, DoRA, embedding, Conv1D, prefix tuning);
- :mod:`.artifacts`: ``lora`` artifacts (tensors + ``adapter_config.json``, ``info`` binding the base);
- :mod:`.jobs`, :mod:`.combine`: the store-level verbs behind ``tsllm lora`` (import, merge with
  the base check, extract, resize, drop, combine, init);
- :mod:`.plans`, :mod:`.streamed`: the engine plans they stream (merge by row blocks; extraction
  and SVD initialisation one module at a time);
- :mod:`.merge`, :mod:`.adapters`: in-memory merge and adapter transforms (the same kernels);
- :mod:`.nf4`, :mod:`.packed`: NF4 (bitsandbytes layout), GPTQ / AWQ dequantisation;
- :mod:`.api`: directory-to-directory helpers, ``merge_adapter`` (QLoRA ``--base-quant nf4``).
"""
from .api import merge_adapter
from .peft_format import LoraAdapter, LoraConfig, ModuleLora, PrefixAdapter, build_adapter, read_adapter, write_adapter

__all__ = ["LoraAdapter", "LoraConfig", "ModuleLora", "PrefixAdapter", "build_adapter", "merge_adapter",
           "read_adapter", "write_adapter"]
