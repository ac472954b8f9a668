"""Pure tensor kernels and their registry (merge methods, sparsify, diff codecs, LoRA, pruning)."""
from .registry import OpSpec, Role, get_op, list_ops, op, register_op

__all__ = ["OpSpec", "Role", "get_op", "list_ops", "op", "register_op"]
