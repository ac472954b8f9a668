"""LoRA adapters: PEFT format, merge, combine, extract, resize, SVD initialisation.

- :mod:`.peft_format`: read / write PEFT adapters (LoRA, DoRA, embedding, Conv1D, prefix tuning);
- :mod:`.merge`: merge an adapter into base tensors (PEFT's ``merge_and_unload`` arithmetic);
- :mod:`.adapters`: combine, resize (``rank-pattern auto``), AdapterDrop, extract, PiSSA / GOAT;
- :mod:`.nf4`, :mod:`.packed`: NF4 (bitsandbytes layout), GPTQ / AWQ dequantisation;
- :mod:`.api`: ``merge_adapter(base_dir, adapter_dir, out_dir)``, the in-memory path until the
  streamed engine job lands.
"""
from .api import merge_adapter
from .peft_format import LoraAdapter, LoraConfig, ModuleLora, PrefixAdapter, build_adapter, read_adapter, write_adapter

__all__ = ["merge_adapter", "read_adapter", "write_adapter", "build_adapter", "LoraAdapter", "LoraConfig",
           "ModuleLora", "PrefixAdapter"]
