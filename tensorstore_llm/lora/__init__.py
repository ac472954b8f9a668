"""LoRA adapters: PEFT format, merge, combine, extract, resize, SVD initialisation."""
