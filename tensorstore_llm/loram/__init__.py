"""LoRAM: recover a LoRA trained on a pruned model to the full model (see :func:`recover_adapter`)."""
from .api import recover_adapter
from .recover import Recovery, recover

__all__ = ["Recovery", "recover", "recover_adapter"]
