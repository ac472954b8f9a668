"""LoRAM: pruning plans, sparsity search, recovery of adapters trained on pruned models."""
