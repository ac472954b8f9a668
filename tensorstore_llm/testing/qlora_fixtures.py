"""Small bf16 Llama bases and PEFT adapters for the QLoRA merge tests (dense and packed NF4)."""
from __future__ import annotations


def write_base(path, sizes: dict, seed: int = 0) -> None:
    """A random ``LlamaForCausalLM`` of config ``sizes``, saved in bf16 to ``path`` (seeded by
    ``seed``; the caller's RNG state is left as it was)."""
    import torch
    import transformers

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
    model.to(torch.bfloat16).save_pretrained(path)


def write_adapter(base, path, config, dyadic: bool = True) -> None:
    """A PEFT adapter of ``config`` on ``base`` with non-zero factors, saved to ``path``.
    ``dyadic``: multiples of 1/64 with few bits, so that B @ A is exact in fp32 whatever order
    BLAS sums in (a row block and the whole tensor then give the same delta, and any difference
    is the NF4 streaming's or packing's); DoRA magnitudes move by 0.05 · noise."""
    import peft
    import torch
    import transformers

    pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(torch.round(noise * 8) / 64 if dyadic and "magnitude" not in n else p + 0.05 * noise)
    pm.save_pretrained(str(path))
