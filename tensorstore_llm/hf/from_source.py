"""Building a transformers causal LM from a TensorSource (a store artifact or HF directory) and
its carried files, in fp32: for analyses that run the model (Sens-Merging's sensitivities).
"""
from __future__ import annotations

import os
import shutil
import tempfile

from ..errors import MissingDependency, RecipeError, ShapeMismatch
from ..io.base import TensorSource


def causal_lm_from_source(source: TensorSource, files: dict, *, device: str = "cpu", where: str = "model"):
    """A transformers causal LM built from ``config.json`` with ``source``'s weights in fp32, and
    its tokenizer; both from the carried files (no download, nothing unpickled).

    Args:
        source: the weights (a store artifact or an HF directory opened as a TensorSource).
        files: carried files, name -> path or bytes (``config.json`` and the tokenizer's files),
            as ``HFCheckpointSource.files()`` or ``Store.carried_files`` return them.
        device: where the model is put.
        where: names the model in errors.
    Returns:
        (model in eval mode, tokenizer).
    Raises:
        RecipeError: no config.json, no tokenizer, not a causal LM, or missing tensors.
        ShapeMismatch: a tensor's shape differs from what config.json builds.
        MissingDependency: transformers is not installed.
    Example:
        >>> model, tokenizer = causal_lm_from_source(store.open("ft1"), store.carried_files("ft1"))  # doctest: +SKIP
    """
    try:
        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise MissingDependency("running a model from its weights needs transformers: pip install 'tensorstore-llm[distill]'") from None
    if "config.json" not in files:
        raise RecipeError(f"{where}: has no config.json, so it cannot be run as a model")
    folder = tempfile.mkdtemp(prefix="tsllm-sens-")
    try:
        for name, path in files.items():
            if isinstance(path, (bytes, bytearray)):
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(path)
            else:
                shutil.copyfile(path, os.path.join(folder, name))
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise RecipeError(f"{where}: transformers cannot read its config.json ({_first_line(e)})") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise RecipeError(f"{where}: no usable tokenizer among its files ({_first_line(e)})") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    # transformers >= 4.56 names it dtype and warns on torch_dtype; older releases know torch_dtype only
    key = "dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"
    setattr(config, key, torch.float32)
    try:
        model = AutoModelForCausalLM.from_config(config, **{key: torch.float32})
    except (ValueError, KeyError) as e:
        raise RecipeError(f"{where}: its config.json does not describe a causal language model ({_first_line(e)})") from None
    state = model.state_dict()
    weights = {}
    for name in state:
        if name in source.keys():
            weights[name] = source.read(name).to(torch.float32)
            if tuple(weights[name].shape) != tuple(state[name].shape):
                raise ShapeMismatch(f"{where}: tensor {name!r} has shape {tuple(weights[name].shape)} but its config.json "
                                    f"builds {tuple(state[name].shape)}")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [m for m in missing if m not in tied and not m.endswith("rotary_emb.inv_freq")]
    if missing:
        raise RecipeError(f"{where}: the checkpoint lacks {len(missing)} tensors its config needs, e.g. {missing[0]!r}")
    return model.to(device).train(False), tokenizer


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
