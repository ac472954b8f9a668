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

The model is built by ``hf.from_source`` and run with transformers in fp32 on the CPU (or the
given device); it needs memory for the weights and their gradients (8 bytes per parameter).
"""
from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict

from ..errors import InvalidParameter, RecipeError
from ..hf.from_source import causal_lm_from_source
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

    model_nn, tokenizer = causal_lm_from_source(model, files, device=device, where=where)
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
