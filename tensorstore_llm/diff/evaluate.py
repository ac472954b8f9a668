"""``tsllm diff-eval``: what a reconstructed fine-tune does to the model, against the true one.

Both models are built from the reference's config and loaded tensor by tensor from their
TensorSources (a store artifact, delta-stored or not, or a Hugging Face directory), in fp32.
The held-out text is cut into windows of ``seq_len`` tokens; for each batch both models run to
their last hidden states, and the fp32 logits are formed ``chunk`` positions at a time, so the
``[batch, seq, vocab]`` logits never exist at once. Reported, over the predicted tokens:

- KL(p_reference ‖ p_candidate) per token, mean and max (nats);
- both perplexities and the relative change, and how often the two argmax tokens agree.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass

from ..errors import DatasetMismatch, FormatError, ShapeMismatch, TensorNotFound

CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                "chat_template.jinja")


@dataclass
class EvalText:
    """Token windows to evaluate on: LongTensor batches [batch, seq_len] and where they came from."""

    batches: list
    source: str

    @property
    def predicted_tokens(self) -> int:
        return sum(b.shape[0] * (b.shape[1] - 1) for b in self.batches)


def model_from_source(source, files: dict[str, str], where: str):
    """A transformers causal LM (fp32, eval mode) built from ``files``' config.json and loaded with
    every parameter from ``source`` (a TensorSource); tied parameters follow their owner.

    Raises FormatError without a config, TensorNotFound / ShapeMismatch naming a missing or
    misshapen tensor.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with _config_dir(files, where) as folder:
        config = AutoConfig.from_pretrained(folder)
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:   # pragma: no cover - older transformers: initialise, then overwrite
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():                                   # every parameter is overwritten below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    names = set(source.keys())
    state = {}
    for name, param in model.named_parameters():          # tied parameters appear once
        if name not in names:
            raise TensorNotFound(f"{where}: tensor {name!r} of the {config.model_type} model is not in the checkpoint")
        meta = source.meta(name)
        if tuple(meta.shape) != tuple(param.shape):
            raise ShapeMismatch(f"{where}: tensor {name!r} has shape {list(meta.shape)}, the model expects {list(param.shape)}")
        state[name] = source.read(name).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state.pop(name))
    model.tie_weights()
    return model.eval()


class _config_dir:
    """A temporary directory holding the config / tokenizer files among ``files`` (name -> path)."""

    def __init__(self, files: dict[str, str], where: str):
        self.files, self.where, self.path = files, where, None

    def __enter__(self) -> str:
        if "config.json" not in self.files:
            raise FormatError(f"{self.where}: no config.json among the checkpoint's files; a model cannot be built")
        self.path = tempfile.mkdtemp(prefix="tsllm-eval-")
        for name, path in self.files.items():
            if name in CONFIG_FILES and os.path.isfile(path):
                shutil.copyfile(path, os.path.join(self.path, name))
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def load_tokenizer(files: dict[str, str], where: str):
    """The tokenizer carried with a checkpoint (its files name -> path)."""
    from transformers import AutoTokenizer

    with _config_dir(files, where) as folder:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise FormatError(f"{where}: no usable tokenizer among the checkpoint's files ({e})") from None
    tokenizer.name_or_path = where   # messages name the checkpoint, not the temporary directory
    return tokenizer


def eval_text(tokenizer, corpus: str | None = None, *, seq_len: int = 256, batches: int = 4, batch_size: int = 4) -> EvalText:
    """Windows of ``seq_len`` tokens from ``corpus`` (a file or directory read by
    :func:`tensorstore_llm.hf.corpus.read_corpus`; documents joined by the EOS token) or, when
    None, from held-out Python standard-library docstrings; evenly spread over the text. When the
    tokenizer starts a text with BOS (:func:`tensorstore_llm.hf.packing.tokenizer_adds_bos`), every
    window is BOS and the next ``seq_len - 1`` tokens.

    Raises DatasetMismatch when the text has fewer tokens than ``batches * batch_size`` windows need.
    """
    import torch

    from ..hf.packing import tokenizer_adds_bos

    if corpus is None:
        from ..testing.finetune import heldout_text

        text, source = heldout_text(), "held-out Python standard-library docstrings"
    else:
        from ..hf.corpus import read_corpus

        docs = read_corpus(corpus, tokenizer=tokenizer).documents
        text, source = (tokenizer.eos_token or "\n\n").join(docs), corpus
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    # a model whose tokenizer starts every text with BOS (Gemma) is off its distribution without
    # it: each window is then BOS followed by seq_len - 1 tokens of the text
    bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    if bos is not None and ids.numel() and int(ids[0]) == bos:
        ids = ids[1:]
    body = seq_len - (bos is not None)
    windows = ids.numel() // body
    need = batches * batch_size
    _require_windows(source, ids.numel(), body, need)
    step = windows // need
    picks = [ids[(k * step) * body:(k * step + 1) * body] for k in range(need)]
    if bos is not None:
        picks = [torch.cat([torch.tensor([bos], dtype=torch.long), p]) for p in picks]
    return EvalText([torch.stack(picks[b * batch_size:(b + 1) * batch_size]) for b in range(batches)], source)


def check_corpus_length(files: dict[str, str], corpus: str | None, *, seq_len: int = 256, batches: int = 4,
                        batch_size: int = 4) -> int | None:
    """Fail fast, before any model is loaded: count ``corpus``'s tokens with the ``tokenizers``
    library alone (the checkpoint's tokenizer.json, documents joined by its tokenizer_config.json
    EOS token, exactly the text :func:`eval_text` builds) and raise :func:`eval_text`'s
    DatasetMismatch when they make fewer than ``batches * batch_size`` windows.

    Returns the token count, or None where this quick count cannot be exact (no corpus: the
    default text is long enough; no tokenizer.json; chat corpora, which need the transformers
    tokenizer's template): :func:`eval_text` checks those itself.
    """
    import json

    if corpus is None or "tokenizer.json" not in files or not os.path.isfile(files["tokenizer.json"]):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:   # pragma: no cover - transformers' fast tokenizers always bring it
        return None
    from ..hf.corpus import read_corpus

    try:
        docs = read_corpus(corpus).documents
    except DatasetMismatch:
        return None        # chat messages (or no text): the full check says what is wrong
    eos = None
    if os.path.isfile(files.get("tokenizer_config.json", "")):
        with open(files["tokenizer_config.json"], encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
    tokens = len(Tokenizer.from_file(files["tokenizer.json"]).encode((eos or "\n\n").join(docs)).ids)
    _require_windows(corpus, tokens, seq_len, batches * batch_size)
    return tokens


def _require_windows(source: str, tokens: int, seq_len: int, need: int) -> None:
    windows = tokens // seq_len
    if windows < need:
        raise DatasetMismatch(f"{source}: {tokens} tokens make {windows} windows of {seq_len}, "
                              f"fewer than the {need} asked for (--batches x --batch-size)")


def kl_to_reference(candidate, reference, text: EvalText, *, chunk: int = 64, real_vocab: int | None = None) -> dict:
    """Mean per-token KL(p_reference ‖ p_candidate), max KL, perplexities and argmax agreement.

    Args:
        candidate, reference: transformers causal LMs (same vocabulary), fp32.
        text: :func:`eval_text`'s windows; position t predicts token t+1.
        chunk: positions whose fp32 logits are formed at once.
        real_vocab: logit columns to keep (padding columns beyond the tokenizer's are dropped).
    Returns:
        {"kl", "kl_max", "tokens", "ppl_reference", "ppl_candidate", "ppl_change", "top1_agreement"}.

    Example:
        >>> r = kl_to_reference(recon_model, ft_model, eval_text(tok))   # doctest: +SKIP
        >>> r["kl"] >= 0
        True
    """
    import torch

    from ..hf.models import final_hidden, head_logits

    vocab = real_vocab or reference.get_output_embeddings().weight.shape[0]
    if candidate.get_output_embeddings().weight.shape[0] < vocab:
        raise ShapeMismatch(f"diff-eval: the candidate's head has {candidate.get_output_embeddings().weight.shape[0]} "
                            f"rows, the reference's vocabulary {vocab}")
    kl_sum, kl_max, tokens, nll_ref, nll_cand, agree = 0.0, 0.0, 0, 0.0, 0.0, 0
    with torch.no_grad():
        for ids in text.batches:
            h_ref = final_hidden(reference, ids)[:, :-1]                         # [batch, seq-1, hidden]
            h_cand = final_hidden(candidate, ids)[:, :-1]
            targets = ids[:, 1:]
            for s in range(0, h_ref.shape[1], chunk):
                lp = torch.log_softmax(head_logits(reference, h_ref[:, s:s + chunk], vocab), -1)   # [batch, c, vocab]
                lq = torch.log_softmax(head_logits(candidate, h_cand[:, s:s + chunk], vocab), -1)
                kl = (lp.exp() * (lp - lq)).sum(-1)                               # [batch, c]
                kl_sum += float(kl.double().sum())
                kl_max = max(kl_max, float(kl.max()))
                tokens += kl.numel()
                tgt = targets[:, s:s + chunk].unsqueeze(-1)
                nll_ref -= float(lp.gather(-1, tgt).double().sum())
                nll_cand -= float(lq.gather(-1, tgt).double().sum())
                agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
    if not tokens:
        raise DatasetMismatch("diff-eval: no token to predict (windows of one token?)")
    ppl_ref, ppl_cand = math.exp(nll_ref / tokens), math.exp(nll_cand / tokens)
    return {"kl": kl_sum / tokens, "kl_max": kl_max, "tokens": tokens, "ppl_reference": ppl_ref,
            "ppl_candidate": ppl_cand, "ppl_change": ppl_cand / ppl_ref - 1.0, "top1_agreement": agree / tokens}


def diff_eval(candidate_source, reference_source, reference_files: dict[str, str], *, corpus: str | None = None,
              seq_len: int = 256, batches: int = 4, batch_size: int = 4, chunk: int = 64,
              where: tuple[str, str] = ("candidate", "reference")) -> dict:
    """Build both models from the reference's config and tokenizer, and compare them on held-out
    text (:func:`kl_to_reference`). Holds both models in fp32.

    Args:
        candidate_source, reference_source: TensorSources of the reconstruction and the true fine-tune.
        reference_files: the reference's carried files (config.json, tokenizer files), name -> path.
        corpus: held-out text (file or directory); default: standard-library docstrings.
    Returns:
        kl_to_reference's dict plus "text" (where the windows came from), "seq_len", "windows".
    """
    check_corpus_length(reference_files, corpus, seq_len=seq_len, batches=batches, batch_size=batch_size)
    tokenizer = load_tokenizer(reference_files, where[1])
    text = eval_text(tokenizer, corpus, seq_len=seq_len, batches=batches, batch_size=batch_size)
    reference = model_from_source(reference_source, reference_files, where[1])
    candidate = model_from_source(candidate_source, reference_files, where[0])
    result = kl_to_reference(candidate, reference, text, chunk=chunk, real_vocab=len(tokenizer))
    return {**result, "text": text.source, "seq_len": seq_len, "windows": batches * batch_size}
