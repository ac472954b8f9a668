"""Loading transformers causal LMs, and running them without materialising full logits.

``load_causal_lm`` takes a Hugging Face directory or a hub id (a store artifact is resolved to an
HF directory by the caller). ``final_hidden`` returns the last hidden states (after the final
norm) and ``head_logits`` applies the LM head to a slice of positions, so that the
``[batch, seq, vocab]`` logits tensor never exists at once.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from ..errors import DatasetMismatch, FormatError, RefError
from ..io.fsutil import file_sha256


@dataclass
class CausalLM:
    """A loaded teacher / student: model (eval mode), tokenizer, where it came from, fingerprint.

    ``fingerprint`` is sha256 over config.json and the sha256 of every weight file (HF dir), or the
    hub repo id and resolved commit.
    """

    model: object
    tokenizer: object
    source: str
    fingerprint: str

    @property
    def real_vocab(self) -> int:
        """Rows of the tokenizer's vocabulary; logit columns beyond it are padding and dropped."""
        return len(self.tokenizer)


def checkpoint_fingerprint(directory: str) -> str:
    """sha256 over config.json's bytes and the sha256 of each ``*.safetensors`` / ``*.bin`` file.

    The weight-file digests are cached next to nothing: hashing a 135M bf16 model takes ~0.3 s.
    """
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name == "config.json" or name.endswith((".safetensors", ".bin")):
            digest.update(name.encode() + b"\x00" + file_sha256(path).encode())
    return digest.hexdigest()


def resolve_source(source: str, *, checksum: bool = True) -> tuple[str, str | None]:
    """(local directory, fingerprint) of an HF directory or hub id ``org/name[@rev]``; the
    fingerprint of a directory is None when ``checksum`` is False.

    Raises FormatError for a directory without config.json, RefError for anything else.
    """
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise FormatError(f"{source}: not a Hugging Face checkpoint directory (no config.json)")
        return source, checkpoint_fingerprint(source) if checksum else None
    from ..io.hub import parse_hub_ref, snapshot

    parsed = parse_hub_ref(source)
    if parsed is None:
        raise RefError(f"teacher {source!r} is neither a directory nor a hub id org/name[@revision]")
    path, commit = snapshot(*parsed)
    return path, hashlib.sha256(f"{parsed[0]}@{commit}".encode()).hexdigest()


def load_causal_lm(source: str, *, dtype: str = "float32", device: str = "cpu", fingerprint: str | None = None,
                   label: str | None = None) -> CausalLM:
    """Load a transformers causal LM and its tokenizer from an HF directory or a hub id.

    Args:
        source: a local directory with config.json (+ weights + tokenizer), or ``org/name[@rev]``.
        dtype: torch dtype name to compute in (float32 by default; bfloat16 on GPUs).
        device: 'cpu', 'cuda' or 'cuda:N'.
        fingerprint / label: recorded instead of the checksum / ``source`` (e.g. a store
            artifact's id and ref when ``source`` is its exported directory).
    Returns:
        :class:`CausalLM` in eval mode.
    Raises:
        FormatError: the directory is not a transformers checkpoint.
        HubUnavailable: a hub id that cannot be resolved.

    Example:
        >>> lm = load_causal_lm(smollm2_checkpoint())   # doctest: +SKIP
        >>> lm.real_vocab
        49152
    """
    import torch
    from transformers import AutoModelForCausalLM

    described = describe_causal_lm(source, fingerprint=fingerprint, label=label)
    path = described.model
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()       # tsllm reports its own progress; transformers' bar would interleave
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as e:
        raise FormatError(f"{source}: cannot load a causal LM with transformers: {e}") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    model.to(device).eval()
    return CausalLM(model, described.tokenizer, described.source, described.fingerprint)


def describe_causal_lm(source: str, *, fingerprint: str | None = None, label: str | None = None) -> CausalLM:
    """A teacher's tokenizer, source and fingerprint without its weights (``model`` holds the
    local directory): what a driver needs when other processes run the model."""
    from transformers import AutoTokenizer

    path, checksum = resolve_source(source, checksum=fingerprint is None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FormatError(f"{source}: cannot load its tokenizer with transformers: {e}") from None
    return CausalLM(path, tokenizer, label or source, fingerprint or checksum)


def head_width(path: str) -> int | None:
    """Output-head rows from config.json (``vocab_size``) without loading weights; None if absent."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    return config.get("vocab_size")


def check_vocab(model, tokenizer) -> int:
    """Width of the model's output head; raises DatasetMismatch when narrower than the tokenizer."""
    width = model.get_output_embeddings().weight.shape[0]
    if width < len(tokenizer):
        raise DatasetMismatch(f"the model's logits have {width} columns but its tokenizer has {len(tokenizer)} "
                              f"tokens: model and tokenizer do not belong together")
    return width


def final_hidden(model, input_ids, attention_mask=None):
    """Last hidden states [batch, seq, hidden] after the final norm, without the LM head."""
    base = getattr(model, model.base_model_prefix, None) or model.get_decoder()
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def head_logits(model, hidden, real_vocab: int):
    """fp32 logits [..., real_vocab] for ``hidden`` [..., hidden_size]: padded columns dropped.

    Applies the model's output embedding (and Gemma-style final logit soft-capping when the config
    asks for it); weights are cast to fp32 so the softmax that follows is computed in fp32.
    """
    import torch

    head = model.get_output_embeddings()
    weight = head.weight[:real_vocab]
    logits = torch.nn.functional.linear(hidden.float(), weight.float(),
                                        None if head.bias is None else head.bias[:real_vocab].float())
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def config_summary(model) -> str:
    """A short JSON of the model's architecture names (recorded with datasets)."""
    return json.dumps({"model_type": model.config.model_type, "architectures": model.config.architectures})
