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


def token_batches(tokenizer, text: str, seq_len: int, batch: int, count: int, seed: int = 0, bos: bool = False):
    """``count`` batches of ``batch`` random windows of ``seq_len`` tokens from ``text`` (LongTensors).

    With ``bos`` each window is the tokenizer's BOS followed by ``seq_len - 1`` tokens of the text:
    what a model whose tokenizer adds BOS (Gemma) sees in use, so a fine-tune does not learn to
    do without it.
    """
    import torch

    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    width = seq_len - 1 if bos else seq_len
    if ids.numel() <= width:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    head = torch.tensor([tokenizer.bos_token_id] if bos else [], dtype=torch.long)
    out = []
    for _ in range(count):
        starts = torch.randint(0, ids.numel() - width, (batch,), generator=gen)
        out.append(torch.stack([torch.cat([head, ids[s:s + width]]) for s in starts.tolist()]))
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
    return cached_finetune("smollm2-135m-instruct", load_smollm2_fp32, steps, lr, seq_len, batch, dtype)


def gemma3_finetune(steps: int = 8, lr: float = 1e-4, seq_len: int = 64, batch: int = 4,
                    dtype: str = "bfloat16", data_seed: int = 0) -> str:
    """A cached HF checkpoint directory: Gemma 3 270M after ``steps`` AdamW steps (as
    :func:`smollm2_finetune`, from the fp32 weights :func:`gemma3_checkpoint` casts). Its 262k
    vocabulary makes a step ~8x SmolLM2's, hence the smaller default batches; ``data_seed``
    draws other windows of the same text, for a second, different fine-tune of the same base.
    Every window starts with BOS, as Gemma's tokenizer starts every text."""
    from .real_models import gemma3_checkpoint

    def load_fp32():   # the cached fp32 conversion: the same weights as the GGUF load, in seconds
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = gemma3_checkpoint("float32")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(path)

    return cached_finetune("gemma3-270m-bos", load_fp32, steps, lr, seq_len, batch, dtype, data_seed, bos=True)


def cached_finetune(prefix: str, load_fp32, steps: int, lr: float, seq_len: int, batch: int,
                    dtype: str, data_seed: int = 0, bos: bool = False) -> str:
    """The fine-tune of the model ``load_fp32()`` returns: ``steps`` AdamW steps on windows of
    :data:`TRAIN_MODULES`' docstrings drawn with ``data_seed`` (BOS-led with ``bos``, see
    :func:`token_batches`), trained once in fp32 and cached under :func:`cache_root` as
    ``prefix-ft...``; other dtypes are cast from the cached fp32 one."""
    def train_fp32(fp32_dir):
        model, tokenizer = load_fp32()
        batches = token_batches(tokenizer, corpus_text(TRAIN_MODULES), seq_len, batch, steps, seed=data_seed, bos=bos)
        finetune(model, batches, lr=lr)
        save_cached(model, tokenizer, fp32_dir)

    def cast(target):   # from the cached fp32 fine-tune
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        fp32_dir = cached_build(_finetune_dir(prefix, steps, lr, "float32", seq_len, batch, data_seed), train_fp32)
        model = AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(fp32_dir)
        save_cached(model.to(getattr(torch, dtype)), tokenizer, target)

    target = _finetune_dir(prefix, steps, lr, dtype, seq_len, batch, data_seed)
    return cached_build(target, train_fp32 if dtype == "float32" else cast)


def _finetune_dir(prefix: str, steps: int, lr: float, dtype: str, seq_len: int = 128, batch: int = 8,
                  data_seed: int = 0) -> str:
    shape = "" if (seq_len, batch) == (128, 8) else f"-seq{seq_len}x{batch}"
    seed = f"-data{data_seed}" if data_seed else ""
    return os.path.join(cache_root(), f"{prefix}-ft{steps}-lr{lr:g}{shape}{seed}-{dtype}")
