"""Sens-Merging's per-layer sensitivity scores, computed from a calibration corpus.

Sens-Merging (Liu et al. 2025, "Sens-Merging: Sensitivity-Guided Parameter Balancing for Merging
Large Language Models") weights each task model's task vector per layer by how much that layer
matters to the task. Here a layer's sensitivity for task model i is the first-order (Taylor)
importance of its task vector on the model's own calibration loss:

    S_i^l = sum over parameters p of layer l of |tau_p * dL/dtheta_p|,   at theta = theta_i,

with tau = theta_i - theta_base and L the mean next-token negative log-likelihood of the model on
the calibration texts. Scores are divided by their mean over the layers of the same model, so
models with different loss scales compare; the merge then softmaxes them across models per layer
with temperature T (``ops.layers.sensitivity_weights``). The paper's cross-task (logit-alignment)
scaling is not computed.

The model is run with transformers in fp32 on the CPU (or the given device); it needs memory for
the weights and their gradients (8 bytes per parameter).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import tempfile
from collections import defaultdict

from ..errors import InvalidParameter, MissingDependency, RecipeError, ShapeMismatch
from ..io.base import TensorSource
from ..ops.layers import layer_key


MAX_LINE_CHARS = 1 << 20      # one calibration text (it is truncated to calibration_tokens anyway)
MAX_CORPUS_CHARS = 256 << 20  # stop reading a corpus here, even if fewer than max_samples texts were found


def read_corpus(path: str, max_samples: int) -> list[str]:
    """Calibration texts: the ``text`` field of each line of a ``.jsonl`` file, else each
    non-empty line of a text file; at most ``max_samples``, lines of at most MAX_LINE_CHARS,
    reading at most MAX_CORPUS_CHARS (a device such as /dev/zero cannot exhaust memory)."""
    texts = []
    read = 0
    try:
        with open(path, encoding="utf-8") as f:
            for number in itertools.count(1):
                line = f.readline(MAX_LINE_CHARS + 1)
                if not line or read > MAX_CORPUS_CHARS:
                    break
                read += len(line)
                if len(line) > MAX_LINE_CHARS:
                    raise RecipeError(f"{path}:{number}: a line longer than {MAX_LINE_CHARS} characters; calibration "
                                      f"texts are truncated to calibration_tokens anyway, so split or shorten it")
                line = line.strip()
                if not line:
                    continue
                if path.endswith(".jsonl"):
                    try:
                        record = json.loads(line)
                    except ValueError:
                        raise RecipeError(f"{path}:{number}: not a JSON object") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise RecipeError(f"{path}:{number}: expected an object with a string 'text' field")
                    line = record["text"]
                texts.append(line)
                if len(texts) >= max_samples:
                    break
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read calibration corpus {path}: {e}") from None
    if not texts:
        raise RecipeError(f"calibration corpus {path} holds no text")
    return texts


def layer_sensitivities(base: TensorSource, model: TensorSource, files: dict[str, str], texts: list[str], *,
                        max_tokens: int = 256, device: str = "cpu", where: str = "model") -> dict[str, float]:
    """{layer key: S^l / mean_l S^l} of ``model`` against ``base`` (see the module docstring).

    ``files`` are the model's carried files (``config.json`` and the tokenizer's files), as
    ``HFCheckpointSource.files()`` or ``Store.carried_files`` return them.
    """
    import torch

    model_nn, tokenizer = _load(model, files, device, where)
    context = getattr(model_nn.config, "max_position_embeddings", None) or getattr(model_nn.config, "n_positions", None)
    if context and max_tokens > context:
        raise InvalidParameter(f"{where}: calibration_tokens {max_tokens} is over the model's context of {context} tokens")
    model_nn.zero_grad(set_to_none=True)
    batches = [tokenizer(t, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"] for t in texts]
    batches = [ids for ids in batches if ids.shape[1] >= 2]
    total = sum(ids.shape[1] - 1 for ids in batches)
    if not total:
        raise RecipeError(f"{where}: the calibration texts tokenize to fewer than 2 tokens each")
    for ids in batches:
        loss = model_nn(input_ids=ids.to(device), labels=ids.to(device)).loss   # mean over ids.shape[1]-1 targets
        (loss * ((ids.shape[1] - 1) / total)).backward()                        # -> mean over all targets
    raw: dict[str, float] = defaultdict(float)
    with torch.no_grad():
        for name, parameter in model_nn.named_parameters():
            if parameter.grad is None or name not in base.keys():
                continue
            tau = parameter.detach() - base.read(name).to(device=device, dtype=torch.float32)
            raw[layer_key(name)] += float((tau * parameter.grad).abs().sum(dtype=torch.float64))
    if not raw:
        raise RecipeError(f"{where}: none of the model's parameters is also a tensor of the base model")
    bad = [key for key, value in raw.items() if not math.isfinite(value)]
    if bad:
        raise RecipeError(f"{where}: the sensitivity of layer {bad[0]} is {raw[bad[0]]} (the calibration loss or "
                          f"gradients are not finite); check the model's weights")
    mean = sum(raw.values()) / len(raw)
    return {key: (value / mean if mean > 0 else 1.0) for key, value in raw.items()}


def _load(source: TensorSource, files: dict[str, str], device: str, where: str):
    """A transformers causal LM built from ``config.json`` with ``source``'s weights in fp32, and
    its tokenizer; both from the carried files (no download)."""
    try:
        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise MissingDependency("computing sensitivities needs transformers: pip install 'tensorstore-llm[distill]'") from None
    if "config.json" not in files:
        raise RecipeError(f"{where}: has no config.json, so it cannot be run to compute sensitivities")
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
