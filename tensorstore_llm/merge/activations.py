"""AIM's statistics pass: the base model's mean |input activation| per input column of every
linear layer, over a calibration corpus, computed once and kept.

AIM (Nobari et al. 2025, "Activation-Informed Merging of Large Language Models") protects the
weights that matter to the base model: a linear layer y = W x whose input feature j is large on
typical text is sensitive to changes of column j of W. The statistic here is
a_j = mean over calibration tokens of |x_j|, recorded by forward pre-hooks on every
``nn.Linear`` of the base model (built by ``hf.from_source``, run in fp32, no gradients), keyed by
the weight's tensor name (``model.layers.0.mlp.down_proj.weight``). Tensors that are not the
weight of a linear layer run on the model's inputs (embeddings, norms, biases) get none.

The statistics are kept in two forms: a safetensors file (``activations:`` of an AIM recipe; read
instead of recomputed when it exists and was made for the same base) and a store artifact of kind
``dataset`` (:func:`store_activations`), whose lineage names the base.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch

from ..errors import FormatError, InvalidParameter, RecipeError
from ..io.base import TensorSource
from ..runs import resolve_input

STATISTIC = "aim-mean-abs-input/1"


def activation_statistics(base: TensorSource, files: dict, texts: list[str], *, max_tokens: int = 256,
                          device: str = "cpu", where: str = "base model") -> dict[str, torch.Tensor]:
    """{weight name: mean |input| per input column (fp32)} of ``base`` over ``texts``.

    Args:
        base: the base model's weights; ``files``: its carried files (config.json, tokenizer).
        texts: calibration texts, each truncated to ``max_tokens`` tokens.
    Returns:
        One 1-D fp32 tensor per linear weight of the base (length = its input features), and
        ``__tokens__``: the number of tokens averaged over, as a 1-element tensor.
    Raises:
        RecipeError when the model cannot be built or the texts hold no tokens.
    Example:
        >>> stats = activation_statistics(src, files, ["some text"], max_tokens=64)   # doctest: +SKIP
    """
    from ..hf.from_source import causal_lm_from_source

    model, tokenizer = causal_lm_from_source(base, files, device=device, where=where)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and max_tokens > context:
        raise InvalidParameter(f"{where}: calibration_tokens {max_tokens} is over the model's context of {context} tokens")
    stored = set(base.keys())
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs):
            x = inputs[0].detach().float()
            total = x.abs().reshape(-1, x.shape[-1]).sum(0, dtype=torch.float64)   # in_features
            sums[name] = total if name not in sums else sums[name] + total
        return record

    handles = [m.register_forward_pre_hook(hook(f"{n}.weight")) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and f"{n}.weight" in stored]
    tokens = 0
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"]
                if ids.shape[1] == 0:
                    continue
                model(input_ids=ids.to(device))
                tokens += int(ids.shape[1])
    finally:
        for handle in handles:
            handle.remove()
    if not tokens:
        raise RecipeError(f"{where}: the calibration texts hold no tokens")
    if not sums:
        raise RecipeError(f"{where}: the model has no linear layer whose weight is a tensor of the base")
    out = {name: (total / tokens).float().cpu() for name, total in sums.items()}
    out["__tokens__"] = torch.tensor([float(tokens)])
    return out


def corpus_digest(texts: list[str]) -> str:
    """sha256 of the calibration texts (records which corpus the statistics came from)."""
    return "sha256:" + hashlib.sha256(json.dumps(texts).encode()).hexdigest()


def save_statistics(path: str, stats: dict[str, torch.Tensor], *, base_identity: str, corpus: str) -> str:
    """Write ``stats`` to the safetensors file ``path`` atomically, recording the base's identity,
    the corpus digest and the statistic's name in its metadata. Returns ``path``."""
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, stage = tempfile.mkstemp(prefix=".activations-", suffix=".safetensors", dir=parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in stats.items()}, stage,
                  metadata={"statistic": STATISTIC, "base": base_identity, "corpus": corpus})
        os.replace(stage, path)
    except BaseException:
        if os.path.exists(stage):
            os.remove(stage)
        raise
    return path


def load_statistics(path: str, *, base_identity: str, where: str) -> dict[str, torch.Tensor]:
    """The statistics in ``path`` (safetensors, never pickle); FormatError when the file is not
    AIM statistics, RecipeError when they were computed for another base model."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            stats = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{where}: activations file {path}: not a readable safetensors file ({e})") from None
    if meta.get("statistic") != STATISTIC:
        raise FormatError(f"{where}: activations file {path} holds {meta.get('statistic')!r}, expected AIM "
                          f"statistics ({STATISTIC})")
    if meta.get("base") != base_identity:
        raise RecipeError(f"{where}: activations file {path} was computed for base {meta.get('base')!r}, not for "
                          f"this recipe's base ({base_identity}); delete it or name another file to recompute")
    for name, t in stats.items():
        if t.dim() != 1 or not torch.isfinite(t).all():
            raise FormatError(f"{where}: activations file {path}: tensor {name!r} must be a finite 1-D vector")
    return stats


def store_activations(store, base: str, corpus: str, *, samples: int = 64, tokens: int = 256,
                      name: str | None = None, device: str = "cpu"):
    """Compute the statistics of store / directory model ``base`` on the text or JSONL file
    ``corpus`` and commit them as a ``dataset`` artifact (tensors, one per linear weight) whose
    lineage is the base and whose info names the statistic and the corpus digest.

    Returns:
        the committed Artifact (tagged ``name`` when given).
    Example:
        >>> store_activations(store, "base", "data/corpus/literature.txt", name="base-aim")   # doctest: +SKIP
    """
    from ..io.base import TensorMeta
    from ..store import job_key
    from .sensitivity import read_corpus

    texts = read_corpus(corpus, samples)
    source, lineage, files = resolve_input(store, base)
    with source:
        stats = activation_statistics(source, files, texts, max_tokens=tokens, device=device)
        identity = source.identity
    digest = corpus_digest(texts)
    writer = store.create(job_key("dataset", STATISTIC, identity, digest, tokens))
    try:
        tensors = {k: v for k, v in stats.items() if k != "__tokens__"}   # the count goes into info
        writer.prepare([TensorMeta(k, tuple(v.shape), "float32") for k, v in tensors.items()])
        for key, value in tensors.items():
            writer.write_rows(key, 0, value)
            writer.finish(key)
        artifact = writer.commit(kind="dataset", parents=[{**lineage, "role": "base"}],
                                 info={"statistic": STATISTIC, "base": identity, "corpus": digest, "tokens": int(stats["__tokens__"][0])},
                                 recipe={"op": "aim_activations", "samples": samples, "tokens": tokens})
    except BaseException:
        writer.abort()
        raise
    if name:
        store.tag(artifact.id, name)
    return artifact
