"""A small, reproducible check of RS-KD's claim, and a worked example of training from the cache.

A random 2-layer student with the teacher's tokenizer (hidden 128, tied embeddings: ~7M
parameters at SmolLM2's 49k vocabulary) is trained with AdamW from a precomputed cache, with

- ``rs-kd``: RS-KD targets (N draws), forward KL against counts / N;
- ``top-k``: top-k targets with k = the RS-KD cache's mean unique ids per position (so at least
  as many stored ids), "ignore tail" loss;
- ``hard``: next-token cross-entropy only;
- ``full``: full-vocabulary KD against the teacher's whole distribution (the reference; its
  log-probs for the training sequences are held in memory in fp16, not stored);

and evaluated by KL(teacher ‖ student) over the full vocabulary on held-out packed sequences
that are not in the cache. This is the plain-PyTorch training loop the dataset and losses are
made for::

    ds = DistillDataset(path, tokenizer=tokenizer)
    for batch in DataLoader(ds, batch_size=8, collate_fn=collate_sparse):
        logits = student(input_ids=batch["input_ids"]).logits
        loss = distill_loss(logits, batch, alpha=1.0)
        loss.backward(); optimiser.step(); optimiser.zero_grad()
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from .dataset import DistillDataset, collate_sparse, to_item
from .losses import dense_kd_loss, distill_loss, hard_ce_loss, topk_kd_loss
from .precompute import SamplingConfig, precompute
from .stats import dataset_stats

METHODS = ("rs-kd", "top-k", "hard", "full")


def tiny_student(vocab: int, *, hidden: int = 128, layers: int = 2, seed: int = 0, tokenizer=None):
    """A randomly initialised Llama-style causal LM with tied embeddings (fp32, train mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=True,
                         bos_token_id=getattr(tokenizer, "bos_token_id", None), eos_token_id=getattr(tokenizer, "eos_token_id", None))
    with torch.random.fork_rng():   # seeded initialisation, the caller's RNG state left as it was
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).float().train()


def held_out_kl(student, input_ids: torch.Tensor, teacher_logp: torch.Tensor) -> float:
    """Mean over positions of KL(teacher ‖ student), full vocabulary; teacher_logp [H, L, V]."""
    student.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(input_ids.shape[0]):
            logs = torch.log_softmax(student(input_ids=input_ids[i:i + 1]).logits.float(), -1)[0]
            t = teacher_logp[i]
            total += float((t.exp() * (t - logs)).sum(-1).mean())
    student.train()
    return total / input_ids.shape[0]


def train_student(method: str, cache: str, tokenizer, vocab: int, *, steps: int, seed: int, eval_ids, teacher_logp,
                  batch_size: int = 8, lr: float = 3e-3, evals: int = 3, log=None, train_logp=None) -> list[float]:
    """Train one student for ``steps`` and return its held-out KL at ``evals`` evenly spaced steps.

    Every method sees the same sequences in the same order (the cache's shard order per epoch);
    ``full`` needs ``train_logp`` {sequence index: teacher log-probs [L, V]}.
    """
    student = tiny_student(vocab, seed=seed, tokenizer=tokenizer)
    optimiser = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    ds = DistillDataset(cache, tokenizer=tokenizer, seed=seed)
    checkpoints = {round(steps * (j + 1) / evals) for j in range(evals)}
    kls, step, epoch = [], 0, 0
    while step < steps:
        ds.set_epoch(epoch)
        for indices, batch in _batches(ds, batch_size):
            logits = student(input_ids=batch["input_ids"]).logits
            if method == "rs-kd":
                loss = distill_loss(logits, batch, alpha=1.0)
            elif method == "top-k":
                loss = topk_kd_loss(logits, batch["target_ids"], batch["target_weights"], batch["target_mask"],
                                    mode="ignore-tail")
            elif method == "full":
                loss = dense_kd_loss(logits, torch.stack([train_logp[i] for i in indices]).float())
            else:
                loss = hard_ce_loss(logits, batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            step += 1
            if step in checkpoints:
                kls.append(held_out_kl(student, eval_ids, teacher_logp))
                if log:
                    log(f"  {method} seed {seed} step {step}: loss {loss.item():.3f} held-out KL {kls[-1]:.3f}")
            if step >= steps:
                break
        epoch += 1
    return kls


def _batches(ds: DistillDataset, batch_size: int):
    """(sequence indices, collated batch) in the dataset's reading order (what a DataLoader with
    ``batch_size`` and ``collate_sparse`` yields, plus the indices)."""
    group = []
    for seq in ds.sequences():
        group.append(seq)
        if len(group) == batch_size:
            yield [s.sequence for s in group], collate_sparse([to_item(s, ds.draws) for s in group])
            group = []
    if group:
        yield [s.sequence for s in group], collate_sparse([to_item(s, ds.draws) for s in group])


def _cached(path: str, make) -> None:
    """Precompute a cache unless ``workdir`` already holds a committed one (a re-run of the experiment)."""
    if not os.path.isfile(os.path.join(path, "dataset.json")):
        make()


def run_learning_experiment(*, steps: int = 150, seeds=(0,), seq_len: int = 128, held_out: int = 6,
                            corpus: str | None = None, teacher=None, max_train: int | None = None,
                            batch_size: int = 8, evals: int = 3, workdir: str | None = None, log=None,
                            methods=METHODS) -> dict:
    """Precompute RS-KD and top-k caches with the SmolLM2 teacher, train students, return held-out KLs.

    Returns {method: [KL at each evaluation, for each seed in turn]}; also {"unique_per_position": [x]}.
    ``full`` holds the teacher's log-probs of every training sequence in memory (fp16).
    """
    from ..hf.corpus import read_corpus
    from ..hf.models import load_causal_lm
    from ..hf.packing import Packing, PackingRule
    from ..testing.real_models import smollm2_checkpoint

    lm = teacher or load_causal_lm(smollm2_checkpoint())
    corpus = read_corpus(corpus or os.path.join(os.path.dirname(__file__), "..", "..", "data", "corpus"), tokenizer=lm.tokenizer)
    rule = PackingRule(seq_len=seq_len)
    packing = Packing(corpus.documents, lm.tokenizer, rule, corpus.fingerprint)
    n_train = len(packing) - held_out if max_train is None else min(max_train, len(packing) - held_out)
    workdir = workdir or tempfile.mkdtemp(prefix="tsllm-learn-")
    rs = os.path.join(workdir, "rs-kd")
    _cached(rs, lambda: precompute(lm, corpus, rs, rule=rule, max_sequences=n_train, shard_sequences=8, batch_size=4))
    unique = dataset_stats(rs)["unique_per_position"]
    tk = os.path.join(workdir, "top-k")
    config = SamplingConfig(method="top-k", k=int(np.ceil(unique)))
    _cached(tk, lambda: precompute(lm, corpus, tk, rule=rule, max_sequences=n_train, shard_sequences=8, batch_size=4,
                                   config=config))
    eval_ids = torch.from_numpy(packing.sequences[len(packing) - held_out:].astype(np.int64))
    with torch.inference_mode():
        teacher_logp = torch.cat([torch.log_softmax(lm.model(input_ids=eval_ids[i:i + 1]).logits.float(), -1)
                                  for i in range(held_out)])
    if log:
        log(f"{n_train} training sequences x {seq_len} tokens, {held_out} held out; RS-KD {unique:.1f} ids/position, "
            f"top-k k={int(np.ceil(unique))}")
    results: dict = {"unique_per_position": [unique]}
    train_logp = None
    if "full" in methods:
        with torch.inference_mode():
            train_logp = {i: torch.log_softmax(lm.model(input_ids=torch.from_numpy(packing.sequences[i:i + 1].astype(np.int64)))
                                               .logits[0, :, :lm.real_vocab].float(), -1).half() for i in range(n_train)}
    for method in methods:
        results[method] = []
    for seed in seeds:                   # every method for a seed, then the next seed: partial runs compare
        for method in methods:
            results[method] += train_student(method, rs if method != "top-k" else tk, lm.tokenizer, lm.real_vocab,
                                             steps=steps, seed=seed, eval_ids=eval_ids, teacher_logp=teacher_logp,
                                             batch_size=batch_size, evals=evals, log=log, train_logp=train_logp)
    return results
