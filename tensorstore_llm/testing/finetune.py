"""A real full fine-tune of SmolLM2-135M for diff-codec tests and benchmarks, cached per machine.

Delta codecs must be measured on the differences a real optimizer makes, not on noise added to a
base: AdamW moves nearly every weight by about ``lr`` per step whatever its magnitude, so the
bf16 difference is a few units in the last place for large weights and many for small ones.
:func:`smollm2_finetune` runs ``steps`` AdamW steps in fp32 on text from the Python standard
library's docstrings (real English and code prose that ships with every interpreter), casts the
result to bf16 and saves it next to :func:`~tensorstore_llm.testing.real_models.smollm2_checkpoint`.
:func:`heldout_text` gives text from other modules, never trained on, for quality measurements.
"""
from __future__ import annotations

import os

from .real_models import cache_root, cached_build, load_smollm2_fp32, save_cached

# Modules whose docstrings form the training text, and others whose docstrings are held out.
TRAIN_MODULES = ("collections", "functools", "itertools", "json", "re", "string", "textwrap",
                 "argparse", "logging", "pathlib", "subprocess", "threading", "heapq", "bisect")
HELDOUT_MODULES = ("datetime", "decimal", "fractions", "statistics", "csv", "difflib", "email",
                   "zipfile", "tarfile", "shutil", "tempfile", "calendar")


def corpus_text(modules: tuple[str, ...]) -> str:
    """The docstrings of ``modules`` and of their public classes and functions, joined.

    Deterministic for a given Python version. Example:
        >>> len(corpus_text(("json",))) > 1000
        True
    """
    import importlib
    import inspect

    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 80:
                    parts.append(doc)
    return "\n\n".join(p for p in parts if p)


def heldout_text() -> str:
    """Text the fine-tune never saw (docstrings of :data:`HELDOUT_MODULES`)."""
    return corpus_text(HELDOUT_MODULES)


def token_batches(tokenizer, text: str, seq_len: int, batch: int, count: int, seed: int = 0):
    """``count`` batches of ``batch`` random windows of ``seq_len`` tokens from ``text`` (LongTensors)."""
    import torch

    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if ids.numel() <= seq_len:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        starts = torch.randint(0, ids.numel() - seq_len, (batch,), generator=gen)
        out.append(torch.stack([ids[s:s + seq_len] for s in starts.tolist()]))
    return out


def finetune(model, batches, lr: float = 1e-4, weight_decay: float = 0.0, seed: int = 0):
    """Train ``model`` in place, one AdamW step per batch (causal LM loss); returns the losses.

    Every parameter is trained (a full fine-tune); with tied embeddings the shared matrix moves once.
    """
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    with torch.random.fork_rng():   # seeded for any dropout, without touching the caller's RNG state
        torch.manual_seed(seed)
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    model.eval()
    return losses


def smollm2_finetune(steps: int = 30, lr: float = 1e-4, seq_len: int = 128, batch: int = 8,
                     dtype: str = "bfloat16") -> str:
    """A cached HF checkpoint directory: SmolLM2-135M-Instruct after ``steps`` AdamW steps.

    Trained in fp32 from the same fp32 weights that :func:`smollm2_checkpoint` casts, so the
    base and this fine-tune in the same ``dtype`` are a true (base, fine-tune) pair. Trained once
    per machine (the fp32 result is cached too; other dtypes are cast from it), then returned from
    the cache. Training takes a few minutes on two free cores. Raises FormatError when SmolLM2 is not
    installed (see ``real_models``).

    Example:
        >>> path = smollm2_finetune()            # doctest: +SKIP
        >>> os.path.isfile(os.path.join(path, "model.safetensors"))   # doctest: +SKIP
        True
    """
    def train_fp32(fp32_dir):
        model, tokenizer = load_smollm2_fp32()
        batches = token_batches(tokenizer, corpus_text(TRAIN_MODULES), seq_len, batch, steps, seed=0)
        finetune(model, batches, lr=lr)
        save_cached(model, tokenizer, fp32_dir)

    def cast(target):   # from the cached fp32 fine-tune
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        fp32_dir = cached_build(_finetune_dir(steps, lr, "float32", seq_len, batch), train_fp32)
        model = AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(fp32_dir)
        save_cached(model.to(getattr(torch, dtype)), tokenizer, target)

    target = _finetune_dir(steps, lr, dtype, seq_len, batch)
    return cached_build(target, train_fp32 if dtype == "float32" else cast)


def _finetune_dir(steps: int, lr: float, dtype: str, seq_len: int = 128, batch: int = 8) -> str:
    shape = "" if (seq_len, batch) == (128, 8) else f"-seq{seq_len}x{batch}"
    return os.path.join(cache_root(), f"smollm2-135m-instruct-ft{steps}-lr{lr:g}{shape}-{dtype}")


